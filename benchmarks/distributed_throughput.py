"""DP-SGD step throughput on W = 1 and W = 2 processes (torchrun, gloo) on this machine.

Each configuration is the real command line — ``privdiff train RECIPE ... train.max_steps=S``,
with ``--nproc W`` for W > 1 — in a fresh run directory; the step times are read from the run's
``train_log.jsonl`` (its cumulative clock), skipping the first ``--warmup`` steps (process start,
the first-step kernel choices; the sample grid after training is drawn with 2 sampler steps and
not timed). Three rows: W = 1 with all cores' threads (what a user gets without --nproc), W = 1 with
cores/2 threads (the per-process share: the baseline for scaling), and W = 2 with cores/2 threads
per process, whose speed-up over the second row is the scaling of adding processes. Steps are logical steps of the same expected batch q·N: the work per
step is the same for every W, only split between the processes.

    .venv/bin/python -W ignore benchmarks/distributed_throughput.py --steps 14 --warmup 4
    .venv/bin/python -W ignore benchmarks/distributed_throughput.py --recipe dpdm-mnist5k train.batch_size=512

The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolation import isolate


def run(recipe: str, overrides: list[str], *, nproc: int, threads: int, steps: int, out: Path) -> dict:
    """Train ``steps`` steps with ``nproc`` processes of ``threads`` threads; the per-step wall times."""
    cmd = [
        sys.executable,
        "-W",
        "ignore",
        "-m",
        "privdiff.cli",
        "train",
        recipe,
        *overrides,
        f"train.max_steps={steps}",
        f"train.checkpoint_every={10 * steps}",
        "sampler.steps=2",
        "--out",
        str(out),
        "--quiet",
    ] + (["--nproc", str(nproc)] if nproc > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"W={nproc} failed:\n{res.stderr[-3000:]}")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    log = [e for e in log if e.get("stage") == "dp_sgd"]
    times = [b["time_s"] - a["time_s"] for a, b in zip(log, log[1:])]
    return {"step_times": times, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="dpdm-mnist5k")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4, help="steps not timed")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    args = p.parse_args()

    from privdiff.config import resolve_recipe
    from privdiff.cli import _recipe_path

    recipe = _recipe_path(args.recipe)
    batch = resolve_recipe(recipe, args.overrides).train.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        isolate(tmp)  # never the user's budget registry or cache
        half = max(1, args.cores // 2)
        for nproc, threads in ((1, args.cores), (1, half), (2, half)):
            r = run(
                recipe,
                args.overrides,
                nproc=nproc,
                threads=threads,
                steps=args.steps,
                out=Path(tmp) / f"w{nproc}t{threads}",
            )
            timed = r["step_times"][args.warmup - 1 :]
            med = statistics.median(timed)
            rows.append((nproc, threads, len(timed), med, min(timed), r["wall"]))
    per_process = rows[1][3]  # W = 1 on one process's share of the cores
    print(f"recipe {args.recipe} {' '.join(args.overrides)}; expected batch {batch}; {args.cores} cores")
    print(
        "| W | threads/process | steps timed | median s/step | best s/step | steps/s | examples/s | vs W=1 on cores/2 threads | command wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for nproc, threads, n, med, best, wall in rows:
        print(
            f"| {nproc} | {threads} | {n} | {med:.3f} | {best:.3f} | {1 / med:.2f} | {batch / med:.0f} | {per_process / med:.2f}× | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
