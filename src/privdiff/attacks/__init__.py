"""Membership-inference attacks on any privdiff run (DPDM, DP-LDM, DPP, LoRA).

``run_attack(RUN, "loss" | "secmi" | "pia" | "pian" | "proxy" | "proxy-loss")`` reads the run's membership
splits (``RUN/splits.json``; drawn and recorded on first use for a run trained on its whole
training split), scores the held-out members against the held-out non-members (the learned
proxy attacker is first trained on the auxiliary roles), and writes ``RUN/attacks/NAME.json``
(auc, asr, tpr_at_1pct_fpr, tpr_at_0.1pct_fpr, n_members, n_nonmembers, roc_png) and the ROC
plot ``RUN/attacks/NAME.png``. Nothing is selected on the held-out roles.
"""

from __future__ import annotations

from .names import ATTACKS

__all__ = ["ATTACKS", "run_attack", "run_attacks"]


def run_attack(run_dir, name: str, **options) -> dict:
    """Attack a run; see :func:`privdiff.attacks.run.run_attack` (imported on use: torch is not needed to list attacks)."""
    from .run import run_attack as _run_attack

    return _run_attack(run_dir, name, **options)


def run_attacks(run_dir, names: list[str], **options) -> dict[str, dict]:
    """Several attacks on one run, loading it once; see :func:`privdiff.attacks.run.run_attacks`."""
    from .run import run_attacks as _run_attacks

    return _run_attacks(run_dir, names, **options)
