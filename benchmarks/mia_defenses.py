"""Plain LoRA against PrivateLoRA, Stable PrivateLoRA and DP-SGD LoRA on mnist5k: utility and membership leakage.

For each recipe it trains (or resumes) the run, runs every attack of ``privdiff attack`` on the
run's recorded splits (held-out members vs held-out non-members; the proxy attacker h′ is
trained on the auxiliary roles), evaluates it with ``privdiff evaluate`` (FID / KID) and prints one
markdown table: ε (the run's ledger; ∞ when not DP), FID, KID, and each attack's AUC and TPR at 1% FPR ("n/r" when 1/n_nonmembers
exceeds 1%), all measured on this machine in this run. With ``--unused-nonmembers N`` the attacks also
score up to N pool examples in no role (``privdiff attack --unused-nonmembers N``), so TPR at 1%
and 0.1% FPR are measured.

    .venv/bin/python -W ignore benchmarks/mia_defenses.py --out runs/mia --n 1000
    .venv/bin/python -W ignore benchmarks/mia_defenses.py --out runs/mia-small --n 500 train.epochs=60

Trailing key=value overrides apply to every recipe. The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from isolation import isolate

RECIPES = {
    "LoRA": "recipes/lora-mnist5k.yaml",
    "PrivateLoRA": "recipes/lora-mnist5k-privatelora.yaml",
    "Stable PrivateLoRA": "recipes/lora-mnist5k-stable.yaml",
    "DP-SGD LoRA": "recipes/lora-mnist5k-dp.yaml",
}
ATTACKS = ("loss", "secmi", "pia", "pian", "proxy", "proxy-loss")


def privdiff(*args: str) -> None:
    subprocess.run([sys.executable, "-W", "ignore", "-m", "privdiff.cli", *args], check=True)


def _scored(path: Path) -> tuple[list[str], int] | None:
    """What an attack result scored: its roles and its number of non-members (None if there is no result yet)."""
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    return r["splits"]["scored"], r["n_nonmembers"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/mia")
    ap.add_argument("--n", type=int, default=1000, help="samples per evaluation (FID/KID)")
    ap.add_argument("--only", nargs="*", choices=list(RECIPES), help="a subset of the recipes")
    ap.add_argument(
        "--unused-nonmembers",
        type=int,
        default=0,
        metavar="N",
        help="attacks also score up to N pool examples in no role",
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every run")
    args = ap.parse_args()
    isolate(args.out)  # never the user's budget registry or cache
    rows = []
    for name, recipe in RECIPES.items():
        if args.only and name not in args.only:
            continue
        run = Path(args.out) / Path(recipe).stem
        privdiff("train", recipe, *args.overrides, "--out", str(run), "--quiet")  # a finished run: nothing to do
        scored = ["member_test", "nonmember_test+unused" if args.unused_nonmembers else "nonmember_test"]
        splits = json.loads((run / "splits.json").read_text())["roles"]
        n_non = (
            len(splits["nonmember_test"]["indices"]) + args.unused_nonmembers
        )  # the pool has more unused examples than asked
        if not all(
            _scored(run / "attacks" / f"{a}.json") == (scored, n_non) for a in ATTACKS
        ):  # delete RUN/attacks to score again
            privdiff(
                "attack", str(run), "--attack", "all", "--quiet", "--unused-nonmembers", str(args.unused_nonmembers)
            )
        if not (run / "metrics.json").is_file():
            privdiff("evaluate", str(run), "--n", str(args.n), "--quiet", "--no-report")
        metrics = json.loads((run / "metrics.json").read_text())
        attacks = {a: json.loads((run / "attacks" / f"{a}.json").read_text()) for a in ATTACKS}
        eps = json.loads((run / "ledger.json").read_text())["epsilon"]  # the accountant's, for what ran (None: not DP)
        rows.append((name, eps, metrics, attacks, metrics["train_time_s"]))  # the run's training clock (its train_log)

    n = next(iter(rows))[3]["loss"]["n_members"] if rows else 0
    n_non = next(iter(rows))[3]["loss"]["n_nonmembers"] if rows else 0
    head = ["method", "ε", "FID", "KID"] + [f"{a} AUC / TPR@1%" for a in ATTACKS] + ["LoRA stage s"]
    print(f"\n{n} held-out members vs {n_non} non-members per attack; FID/KID from privdiff evaluate --n {args.n}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, eps, m, a, wall in rows:

        def cell(r):
            tpr = "n/r" if r["tpr_at_1pct_fpr"] is None else f"{r['tpr_at_1pct_fpr']:.3f}"
            return f"{r['auc']:.3f} / {tpr}"

        print(
            f"| {name} | {'∞' if eps is None else f'{eps:.2f}'} | {m['metrics']['fid']['value']:.2f} | {m['metrics']['kid']['value']:.4f} | "
            + " | ".join(cell(a[x]) for x in ATTACKS)
            + f" | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
