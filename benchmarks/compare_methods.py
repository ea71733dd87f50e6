"""privdiff's methods against each other on mnist5k at the same ε, each with its shipped recipe.

For each ε and method it trains (or resumes, when the run directory already holds it) the
method's recipe for that ε (``NAME-eps1.yaml`` where one ships, else the default recipe with
``privacy.epsilon`` set), evaluates it with ``privdiff evaluate`` at the
same sample count and seed, and prints one table: downstream accuracy on the real test split
(CNN, logistic regression), FID and KID in the public feature space, the composed ε of the
ledger, and the training cost of all stages (public pretraining and DPP's release included):
the run's wall clock, and the CPU seconds (user + system, all threads) of the training
process, which is the fairer "CPU budget" when other work shares the machine.

    .venv/bin/python -W ignore benchmarks/compare_methods.py --methods DPDM DPP DP-LDM --epsilon 1 10 --n 2000 --out runs/methods
    .venv/bin/python -W ignore benchmarks/compare_methods.py --methods DPDM DP-LDM --epsilon 10 1 --n 2000 --out runs/ldm-vs-dpdm-c0 --override DP-LDM:ldm.public_contrast=0

A run directory that already holds a finished run is resumed (nothing trained again) and its
evaluation reused; its CPU seconds are then read from ``cost.json``, written when it was trained.
The table is also written to OUT/table.md. The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from isolation import isolate

RECIPES = {
    "DPDM": "recipes/dpdm-mnist5k.yaml",
    "DPP": "recipes/dpp-mnist5k.yaml",
    "DP-LDM": "recipes/dp-ldm-mnist5k.yaml",
}


def recipe_for(method: str, eps: float) -> str:
    """The method's shipped recipe for this ε (``NAME-eps1.yaml``) when there is one, else its default recipe."""
    specific = Path(RECIPES[method].replace(".yaml", f"-eps{eps:g}.yaml"))
    return str(specific) if specific.is_file() else RECIPES[method]


def privdiff(*args: str) -> float:
    """Run the privdiff CLI in a child process; returns its CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-W", "ignore", "-m", "privdiff.cli", *args], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def train_seconds(run: Path) -> float:
    """Training wall time of all stages: the run's log keeps one clock across stages and resumes (time_s is cumulative)."""
    times = [0.0]
    for line in (run / "train_log.jsonl").read_text().splitlines():
        try:
            times.append(float(json.loads(line).get("time_s", 0.0)))
        except (ValueError, AttributeError):
            continue
    return max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--n", type=int, default=2000, help="samples per evaluation")
    ap.add_argument("--out", default="runs/methods")
    ap.add_argument(
        "--override", nargs="*", default=[], metavar="METHOD:key=value", help="a recipe override for one method only"
    )
    args = ap.parse_args()
    isolate(args.out)  # never the user's budget registry or cache
    extra: dict[str, list[str]] = {m: [] for m in args.methods}
    for o in args.override:
        method, _, kv = o.partition(":")
        if method not in extra or "=" not in kv:
            ap.error(f"--override {o!r}: expected METHOD:key=value with METHOD one of {args.methods}")
        extra[method].append(kv)
    rows = []
    for eps in args.epsilon:
        for name in args.methods:
            run = Path(args.out) / f"{name.lower()}-eps{eps:g}"
            cost = run / "cost.json"
            done = cost.is_file()
            cpu = privdiff(
                "train", recipe_for(name, eps), f"privacy.epsilon={eps}", *extra[name], "--out", str(run), "--quiet"
            )
            if done:
                cpu = json.loads(cost.read_text())["train_cpu_s"]
            else:
                cost.write_text(json.dumps({"train_cpu_s": cpu}))
            privdiff("evaluate", str(run), "--n", str(args.n), "--quiet", "--no-report")
            m = json.loads((run / "metrics.json").read_text())
            ledger = json.loads((run / "ledger.json").read_text())
            rows.append((name, eps, ledger["epsilon"], m["metrics"], train_seconds(run), cpu))
    lines = [
        f"mnist5k, {args.n} samples per model; classifiers tested on the real test split; FID/KID in the public feature space",
        "",
        "| method | target ε | ledger ε | acc. CNN | acc. LogReg | FID | KID | train wall s | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, eps, spent, mm, wall, cpu in rows:
        lines.append(
            f"| {name} | {eps:g} | {spent:.4f} | {mm['accuracy_cnn']['value']:.3f} | {mm['accuracy_logreg']['value']:.3f} | "
            f"{mm['fid']['value']:.3f} | {mm['kid']['value']:.4f} | {wall:.0f} | {cpu:.0f} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    (Path(args.out) / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
