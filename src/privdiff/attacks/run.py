"""``run_attack``: attack a run directory and write RUN/attacks/NAME.json and NAME.png (see the package docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..runs import Run, RunError
from .names import ATTACKS
from .metrics import attack_metrics, save_roc_plot
from .proxy import proxy_scores
from .scores import loss_scores, pia_scores, secmi_scores
from .target import load_target, role_datasets, run_splits

__all__ = ["run_attack", "run_attacks"]


def run_attack(run_dir: str | Path, name: str, **options) -> dict:
    """Attack the run in ``run_dir`` with ``name`` (a key of :data:`ATTACKS`); see :func:`run_attacks`."""
    return run_attacks(run_dir, [name], **options)[name]


def run_attacks(
    run_dir: str | Path,
    names: list[str],
    *,
    n_per_role: int | None = None,
    seed: int = 0,
    unused_nonmembers: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Attack the run in ``run_dir`` with each of ``names``; returns and writes each result.

    The run, its splits and its examples are loaded once for all attacks.

    Args:
        run_dir: A trained run directory.
        names: Keys of :data:`ATTACKS`.
        n_per_role: Examples per role when the splits are drawn now (default: as many as balance
            allows); an error if the run already records splits of another size.
        seed: Seed of the attacks' noise draws (and of the proxy attacker's training).
        unused_nonmembers: Score, besides ``nonmember_test``, up to this many examples of the non-member
            split that are in no role (never trained on, never seen by a proxy; a fixed random subset):
            with 1,000 on a LoRA run, TPR at 1% and 0.1% FPR become measurable. Members stay ``member_test``.
        progress: Show progress bars.
    """
    for name in names:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r} (available: {', '.join(ATTACKS)})")
    run = Run(run_dir)
    if not run.config_path.is_file():
        raise RunError(f"{run.path}: not a privdiff run (no config.yaml)")
    if run.latest_checkpoint() is None:
        raise RunError(f"{run.path}: no checkpoint to attack (train it first)")
    splits = run_splits(run, n_per_role=n_per_role)
    if n_per_role is not None and splits.size("member_test") != n_per_role:
        raise ValueError(
            f"{run.path / 'splits.json'} records {splits.size('member_test')} examples per role, not {n_per_role}"
        )
    target = load_target(run)
    roles = role_datasets(splits, unused_nonmembers=unused_nonmembers, recipe=target.recipe)
    x = {role: target.inputs(ds) for role, ds in roles.items()}
    scored = ["member_test", "nonmember_test"]
    if unused_nonmembers:  # one non-member side: the held-out role and the unused examples
        (a, ca), (b, cb) = x.pop("nonmember_test"), x.pop("nonmember_unused")
        x["nonmember_test"] = (torch.cat([a, b]), None if ca is None else torch.cat([ca, cb]))
        scored = ["member_test", "nonmember_test+unused"]
    return {
        name: _attack(run, target, x, name, splits=splits, scored=scored, seed=seed, progress=progress)
        for name in names
    }


LEARNED = {"proxy": "map", "proxy-loss": "loss"}  # the learned attacks and the feature their h′ reads


def _attack(run: Run, target, x: dict, name: str, *, splits, scored: list[str], seed: int, progress: bool) -> dict:
    learned = name in LEARNED
    if learned:
        aux = (*x["member_aux"], *x["nonmember_aux"])
        test = (*x["member_test"], *x["nonmember_test"])
        sm, sn = proxy_scores(target, aux, test, seed=seed, feature=LEARNED[name], progress=progress)
    else:
        fn = {
            "loss": lambda *a: loss_scores(*a, seed=seed, progress=progress),
            "secmi": lambda *a: secmi_scores(*a, progress=progress),
            "pia": lambda *a: pia_scores(*a, progress=progress),
            "pian": lambda *a: pia_scores(*a, normalized=True, progress=progress),
        }[name]
        sm, sn = fn(target, *x["member_test"]), fn(target, *x["nonmember_test"])
    m = attack_metrics(sm, sn)
    out = run.path / "attacks"
    save_roc_plot(
        out / f"{name}.png",
        {name: {**m["roc"], "auc": m["auc"]}},
        title=f"{name} on {run.path.name}: {m['n_members']} members vs {m['n_nonmembers']} non-members",
    )
    result = {
        "attack": name,
        "description": ATTACKS[name],
        **{k: v for k, v in m.items() if k != "roc"},
        "roc_png": f"{name}.png",
        "seed": seed,
        "splits": {
            "file": "splits.json",
            "scored": scored,
            "trained_attacker_on": ["member_aux", "nonmember_aux"] if learned else [],
            "model_trained_on": splits.trained_on,
        },
        "roc": m["roc"],
    }
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    return result
