"""``privdiff audit``: train a recipe once with canaries and check its claimed ε empirically.

See :mod:`privdiff.privacy.audit` for the canaries, the attack and the bound. The run is a normal
run directory (ledger, registry entry, checkpoints) plus ``audit.json``; it must be fresh, since
the canaries' coins and coordinates are not part of a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from ..config import Recipe
from ..data import load_dataset
from ..privacy.audit import AuditResult, GradientCanaries
from ..runs import Run, RunError, open_run
from .stages import open_ledger, train_denoiser


@dataclass
class AuditRun:
    run: Run
    result: AuditResult

    @property
    def path(self) -> Path:
        return self.run.path / "audit.json"


def audit(recipe: Recipe, *, out: str | Path, canaries: int = 1000, k_in: int | None = None, k_out: int | None = None,
          confidence: float = 0.95, progress: bool = True) -> AuditRun:
    """Train ``recipe`` (a DPDM recipe: one DP-SGD stage) with ``canaries`` gradient canaries into a fresh
    run ``out``; write ``RUN/audit.json`` with the claimed ε (the ledger's), the audited lower bound, the
    canary count and the attack."""
    if recipe.method != "dpdm":
        raise ValueError(f"privdiff audit supports DPDM recipes (one DP-SGD stage); {recipe.method} is not supported yet")
    if not recipe.privacy.enabled:
        raise ValueError("privacy.enabled=false: a non-private run claims no epsilon to audit")
    d = recipe.data
    dataset = load_dataset(d.name, root=d.root, split="train", resolution=d.resolution)
    run = open_run(out, recipe)
    if run.latest_checkpoint() is not None or (run.path / "audit.json").exists():
        raise RunError(f"{run.path} already holds a run: an audit needs a fresh --out")
    ledger = open_ledger(run, recipe, dataset)
    c = GradientCanaries(m=canaries, num_examples=len(dataset), seed=recipe.train.seed)
    trained = train_denoiser(run=run, recipe=recipe, dataset=dataset, ledger=ledger, progress=progress, audit=c)
    result = c.result(claimed_epsilon=ledger.epsilon(), delta=ledger.delta, k_in=k_in, k_out=k_out, beta=1 - confidence,
                      seed=recipe.train.seed)
    if result.steps != trained.steps:
        raise RuntimeError("internal error: the canaries did not see every private step")
    atomic_write_text(run.path / "audit.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return AuditRun(run=run, result=result)
