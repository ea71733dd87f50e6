"""DP-LDM against DPDM on mnist5k at the same ε, each with its shipped recipe (about the same CPU time).

For each ε it trains (or resumes, when the run directory already holds it) the DPDM recipe and
the DP-LDM recipe, evaluates both with ``privdiff evaluate`` at the same sample count and seed,
and prints one table: downstream accuracy on the real test split (CNN, logistic regression),
FID in the public feature space, and the wall time of training (all stages; DP-LDM's public
stages included), all measured on this machine in this run.

    .venv/bin/python -W ignore benchmarks/dp_ldm_vs_dpdm.py --epsilon 10 1 --n 2000 --out runs/ldm-vs-dpdm
    .venv/bin/python -W ignore benchmarks/dp_ldm_vs_dpdm.py --epsilon 10 1 --n 2000 --out runs/ldm-vs-dpdm-c0 --ldm ldm.public_contrast=0

A run directory that already holds a finished run is resumed (nothing trained again) and its
evaluation reused, so rows can be added to an earlier comparison by copying its runs.

The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {"DPDM": "recipes/dpdm-mnist5k.yaml", "DP-LDM": "recipes/dp-ldm-mnist5k.yaml"}


def privdiff(*args: str) -> None:
    subprocess.run([sys.executable, "-W", "ignore", "-m", "privdiff.cli", *args], check=True)


def train_seconds(run: Path) -> float:
    """Training time of all stages: the run's log keeps one clock across stages and resumes (time_s is cumulative)."""
    times = [0.0]
    for line in (run / "train_log.jsonl").read_text().splitlines():
        try:
            times.append(float(json.loads(line).get("time_s", 0.0)))
        except (ValueError, AttributeError):
            continue
    return max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilon", type=float, nargs="+", default=[10.0, 1.0])
    ap.add_argument("--n", type=int, default=2000, help="samples per evaluation")
    ap.add_argument("--out", default="runs/ldm-vs-dpdm")
    ap.add_argument("--ldm", nargs="*", default=[], metavar="key=value", help="overrides of the DP-LDM recipe only")
    args = ap.parse_args()
    rows = []
    for eps in args.epsilon:
        for name, recipe in RECIPES.items():
            run = Path(args.out) / f"{name.lower()}-eps{eps:g}"
            t = time.perf_counter()
            extra = args.ldm if name == "DP-LDM" else []
            privdiff("train", recipe, f"privacy.epsilon={eps}", *extra, "--out", str(run), "--quiet")
            wall = time.perf_counter() - t
            privdiff("evaluate", str(run), "--n", str(args.n), "--quiet", "--no-report")
            m = json.loads((run / "metrics.json").read_text())
            rows.append((name, eps, m, train_seconds(run), wall))
    print(f"\nmnist5k, {args.n} samples per model, downstream classifiers tested on the real test split")
    print(f"{'method':<8} {'eps':>5} {'acc CNN':>8} {'acc logreg':>11} {'FID':>7} {'train s (all stages)':>21}")
    for name, eps, m, secs, _ in rows:
        mm = m["metrics"]
        print(f"{name:<8} {eps:>5g} {mm['accuracy_cnn']['value']:>8.3f} {mm['accuracy_logreg']['value']:>11.3f} "
              f"{mm['fid']['value']:>7.3f} {secs:>21.0f}")


if __name__ == "__main__":
    main()
