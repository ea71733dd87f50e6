"""``privdiff audit``: train a recipe once with canaries and check its claimed ε empirically.

See :mod:`privdiff.privacy.audit` for the canaries, the attack and the bound. Recipes whose private
training is one DP-SGD stage of the shared loop can be audited (``auditable`` in
:mod:`privdiff.method_registry`): DPDM, DP-LDM (public stages, then
DP-SGD of the trainable subset) and DPP (a Gaussian release, then DP-SGD). The method's own
``train`` runs, with the canaries in its DP-SGD stage only, so the bound is checked against that
stage's ε (the accountant on its events alone) and the run's composed ε is reported beside it.

The run is a normal run directory (ledger, registry entry, checkpoints, a one-per-class grid) plus
``audit.json``; it must be fresh, since the canaries' coins and coordinates are not part of a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from ..config import Recipe
from ..core.stages import private_dataset
from ..method_registry import METHODS, get_method
from ..privacy.audit import AuditResult, GradientCanaries
from ..runs import Run, RunError


@dataclass
class AuditRun:
    run: Run
    result: AuditResult

    @property
    def path(self) -> Path:
        return self.run.path / "audit.json"


def audit(
    recipe: Recipe,
    *,
    out: str | Path,
    canaries: int = 1000,
    k_in: int | None = None,
    k_out: int | None = None,
    confidence: float = 0.95,
    progress: bool = True,
) -> AuditRun:
    """Train ``recipe`` (DPDM, DP-LDM or DPP) with ``canaries`` gradient canaries in its DP-SGD stage into a
    fresh run ``out``; write ``RUN/audit.json`` with the claimed ε (the ledger's total), the DP-SGD stage's
    own ε, the audited lower bound, the canary count and the attack."""
    method = get_method(recipe.method)
    if not method.auditable:
        raise ValueError(
            f"privdiff audit supports recipes whose private training is one DP-SGD stage "
            f"({', '.join(m.name for m in METHODS.values() if m.auditable)}); {recipe.method} is not one"
        )
    if not recipe.privacy.enabled:
        raise ValueError("privacy.enabled=false: a non-private run claims no epsilon to audit")
    run = Run(out)
    if run.ledger_path.exists() or (run.path / "audit.json").exists():
        raise RunError(f"{run.path} already holds a run: an audit needs a fresh --out")
    n = len(private_dataset(recipe))  # the DP-SGD stage's examples
    c = GradientCanaries(m=canaries, num_examples=n, seed=recipe.train.seed)
    trained = method.train(recipe, out=out, progress=progress, grid_per_class=1, audit=c)
    ledger = trained.ledger
    result = c.result(
        claimed_epsilon=ledger.epsilon(),
        stage=method.private_stage,
        stage_epsilon=ledger.epsilon(stage=method.private_stage),
        delta=ledger.delta,
        k_in=k_in,
        k_out=k_out,
        beta=1 - confidence,
        seed=recipe.train.seed,
    )
    if result.steps != trained.steps or result.steps != ledger.steps(method.private_stage):
        raise RuntimeError("internal error: the canaries did not see every private step")
    atomic_write_text(trained.run.path / "audit.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return AuditRun(run=trained.run, result=result)
