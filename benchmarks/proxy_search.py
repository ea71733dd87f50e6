"""Choose recipe defaults honestly: on a PUBLIC proxy task, never on mnist5k's results (issue 20, item 3).

The proxy plays the demo's game with public data only:

* "private" data: scikit-learn's handwritten ``digits`` (1,437 train / 360 test, drawn at 28×28), real
  handwriting that no candidate pretrains on, trained on with DP-SGD at the demo's ε and δ;
* public prior: ``glyphs`` (digits rendered from fonts, public by construction), for every stage that
  uses public data (pretraining, the DP-LDM autoencoder, the feature network of FID/KID);
* the score: ``privdiff evaluate``'s downstream CNN accuracy on the proxy's real test split (and class
  consistency, FID, KID), at the same sample count and seed for every candidate, beside the training
  CPU seconds, so candidates are compared at the demo's CPU budget.

N differs from mnist5k's (1,437 against 4,000): q = batch/N is larger at the same batch, so the proxy is
the harder task at the same ε; the ranking, not the level, is what carries over. Each candidate is a
shipped recipe plus overrides; the winner per ε is the highest downstream CNN accuracy whose training
CPU seconds are within ``--cpu-budget``.

    .venv/bin/python -W ignore benchmarks/proxy_search.py --epsilon 10 1 --n 2000 --out runs/proxy
    .venv/bin/python -W ignore benchmarks/proxy_search.py --only dp-ldm-glyphs --smoke --out /tmp/proxy-smoke

Runs already trained in OUT are resumed and their evaluation redone; the table is printed and written to
OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compare_methods import privdiff, train_seconds
from isolation import isolate

PROXY = ["data.name=digits", "data.resolution=28", "evaluate.public_data=glyphs"]
GLYPHS_LDM = ["ldm.public_data=glyphs", "ldm.public_margin=0", "ldm.public_contrast=0"]
GLYPHS_DPDM = ["dpdm.public_data=glyphs", "dpdm.public_margin=0", "dpdm.public_contrast=0"]  # PDP-Diffusion

CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "dpdm": ("dpdm-mnist5k", []),
    "dpdm-glyphs": ("dpdm-mnist5k", GLYPHS_DPDM),
    "dp-ldm-glyphs": ("dp-ldm-mnist5k", GLYPHS_LDM),
    "dp-ldm-glyphs-K4": ("dp-ldm-mnist5k", [*GLYPHS_LDM, "privacy.noise_multiplicity=4"]),
    "dp-ldm-glyphs-80ep": ("dp-ldm-mnist5k", [*GLYPHS_LDM, "train.epochs=80"]),
}
"""name → (shipped recipe, overrides): the demo's methods with the public prior swapped to ``glyphs``."""

SMOKE = [  # seconds, not minutes: checks the script end to end, measures nothing
    "train.max_steps=2",
    "ldm.autoencoder.epochs=1",
    "ldm.pretrain.epochs=1",
    "dpdm.pretrain.max_steps=2",
    "sampler.steps=2",
    "evaluate.classifier_epochs=1",
    "evaluate.feature_epochs=1",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilon", type=float, nargs="+", default=[10.0])
    ap.add_argument("--only", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    ap.add_argument("--n", type=int, default=2000, help="samples per evaluation")
    ap.add_argument("--cpu-budget", type=float, default=float("inf"), help="training CPU seconds a winner may use")
    ap.add_argument("--smoke", action="store_true", help="two steps per stage: a check of the script, not a search")
    ap.add_argument("--out", default="runs/proxy")
    args = ap.parse_args()
    isolate(args.out)  # never the user's budget registry or cache
    smoke = SMOKE if args.smoke else []
    rows = []
    for eps in args.epsilon:
        for name in args.only:
            recipe, overrides = CANDIDATES[name]
            run = Path(args.out) / f"{name}-eps{eps:g}"
            train = [*PROXY, *overrides, f"privacy.epsilon={eps}", *[o for o in smoke if not o.startswith("evaluate")]]
            cpu = privdiff("train", recipe, *train, "--no-grid", "--out", str(run), "--quiet")
            evaluate = [o for o in smoke if o.startswith("evaluate")]
            privdiff("evaluate", str(run), "--n", str(args.n), *evaluate, "--quiet", "--no-report")
            m = json.loads((run / "metrics.json").read_text())["metrics"]
            spent = json.loads((run / "ledger.json").read_text())["epsilon"]
            consistency = (m.get("class_consistency") or {}).get("value")
            rows.append((name, eps, spent, m, consistency, train_seconds(run), cpu))
    lines = [
        f"public proxy: private = scikit-learn digits at 28 px, public = glyphs; {args.n} samples per model"
        + (" (SMOKE: 2 steps per stage, not a measurement)" if args.smoke else ""),
        "",
        "| candidate | target ε | ledger ε | acc. CNN | class consistency | FID | train wall s | train CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, eps, spent, m, cons, wall, cpu in rows:
        cons_text = "n/a" if cons is None else f"{cons:.3f}"
        lines.append(
            f"| {name} | {eps:g} | {spent:.4f} | {m['accuracy_cnn']['value']:.3f} | {cons_text} | "
            f"{m['fid']['value']:.3f} | {wall:.0f} | {cpu:.0f} |"
        )
    for eps in args.epsilon:
        within = [r for r in rows if r[1] == eps and r[6] <= args.cpu_budget]
        if within:
            best = max(within, key=lambda r: r[3]["accuracy_cnn"]["value"])
            lines.append(f"\nwinner at ε = {eps:g}: {best[0]} (downstream CNN {best[3]['accuracy_cnn']['value']:.3f})")
    text = "\n".join(lines)
    print("\n" + text)
    (Path(args.out) / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
