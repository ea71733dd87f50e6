"""The privacy ledger: every release that touched private data, and the (ε, δ) they compose to.

``ledger.json`` is written atomically and *before* the data is touched (write-ahead): a run
killed mid-step has already counted that step. Anyone can recompute ε from ``events`` alone with
:func:`privdiff.privacy.accounting.epsilon`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .accounting import epsilon as compose_epsilon
from .events import NON_PRIVATE, SUBSAMPLED_GAUSSIAN, Release, check_number

__all__ = ["NON_PRIVATE", "SUBSAMPLED_GAUSSIAN", "Ledger", "Release", "format_ledger"]


@dataclass
class Ledger:
    """Privacy-relevant releases of one run, in execution order.

    Attributes:
        delta: the δ at which ε is reported.
        accountant: ``"rdp"`` or ``"prv"``.
        dataset: ``{"name", "fingerprint", "size"}`` of the private data.
        target_epsilon: the budget; ``None`` for a non-private run.
        events: the releases (:class:`~privdiff.privacy.events.Release`), in order (in the file: objects with
            ``stage``, ``mechanism``, ``noise_multiplier``, ``sample_rate``, ``max_grad_norm``,
            ``sensitivity``, ``steps``).
        public_stages: stages that touched public data only (``stage``, ``data`` identity,
            ``steps``): what the model learned outside the budget, never part of ε.
    """

    delta: float
    accountant: str
    dataset: dict[str, Any]
    target_epsilon: float | None = None
    events: list[Release] = field(default_factory=list)
    public_stages: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the run's key in the budget registry
    # called with the ledger on every save, before the file is written (the budget registry's
    # write-ahead record, which may refuse the new events); not saved
    sink: Callable[["Ledger"], None] | None = field(default=None, repr=False, compare=False)

    # -- composition --------------------------------------------------------------------------
    def history(
        self, extra: list[tuple[float, float, int]] = (), *, exclude_stage: str | None = None, stage: str | None = None
    ) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sample_rate, steps)`` of every event (optionally not of one stage, or of
        ``stage`` alone), plus ``extra``."""
        return [e.triple for e in self.events if e.stage != exclude_stage and stage in (None, e.stage)] + list(extra)

    @property
    def private(self) -> bool:
        return all(e.private for e in self.events)

    def epsilon(self, *, extra: list[tuple[float, float, int]] = (), stage: str | None = None) -> float:
        """ε(δ) of all events (plus ``extra`` hypothetical ones); ``inf`` if anything ran without noise.

        ``stage``: the ε of that stage's events alone, as if nothing else had run (what an audit whose
        canaries live in that stage can check); the run's claim is the composition of all stages."""
        if any(not e.private for e in self.events if stage in (None, e.stage)):
            return math.inf
        return compose_epsilon(self.history(extra, stage=stage), delta=self.delta, accountant=self.accountant)

    def steps(self, stage: str) -> int:
        return sum(e.steps for e in self.events if e.stage == stage)

    # -- recording ----------------------------------------------------------------------------
    def record(self, release: Release) -> None:
        """Count ``release``: merged into the last event if that is the same mechanism (more steps of it)."""
        if not isinstance(release, Release):
            raise TypeError(f"a ledger records Releases, got {type(release).__name__}")
        last = self.events[-1] if self.events else None
        if last is not None and last.same_mechanism(release):
            self.events[-1] = last.with_steps(last.steps + release.steps)
        else:
            self.events.append(release)

    def record_public(self, *, stage: str, data: dict[str, Any], steps: int) -> None:
        """Note a stage that trained on public ``data`` (its identity: name, split, fingerprint, size)."""
        if data.get("fingerprint") == self.dataset.get("fingerprint"):
            raise ValueError(f"stage {stage}: its 'public' data is the private data set")
        entry = {"stage": stage, "data": dict(data), "steps": int(steps)}
        self.public_stages = [e for e in self.public_stages if e["stage"] != stage] + [entry]

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        eps = self.epsilon()
        return {
            "epsilon": None if math.isinf(eps) else eps,
            "delta": self.delta,
            "accountant": self.accountant,
            "private": self.private,
            "target_epsilon": self.target_epsilon,
            "dataset": self.dataset,
            "events": [e.to_dict() for e in self.events],
            "public_stages": self.public_stages,
            "run_id": self.run_id,
        }

    def save(self, path: str | Path) -> None:
        if self.sink is not None:
            self.sink(self)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Ledger":
        """Read ``ledger.json``; a damaged one (unreadable, not JSON, fields missing or of the wrong kind) is a
        one-line ValueError naming the file, never a ledger that would compose to a wrong ε later."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            ledger = cls(
                delta=d["delta"],
                accountant=d["accountant"],
                dataset=d["dataset"],
                target_epsilon=d.get("target_epsilon"),
                events=[Release.from_dict(e) for e in d["events"]],
                public_stages=list(d.get("public_stages", [])),
                **({"run_id": d["run_id"]} if d.get("run_id") else {}),
            )
            _check_loaded(ledger)
            return ledger
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            msg = (str(e).splitlines() or [""])[0][:200]
            raise ValueError(f"{path}: not a privdiff ledger, or damaged ({type(e).__name__}: {msg})") from None
        except OSError as e:
            raise ValueError(f"{path}: unreadable ({e.strerror or e})") from None


def _check_loaded(ledger: "Ledger") -> None:
    """What :meth:`Ledger.load` read has the shape and ranges a ledger's fields have (ValueError otherwise)."""
    check_number(ledger.delta, "delta", high=1.0)
    if (
        not isinstance(ledger.accountant, str)
        or not isinstance(ledger.dataset, dict)
        or not isinstance(ledger.run_id, str)
    ):
        raise ValueError("accountant, dataset or run_id of the wrong kind")
    if ledger.target_epsilon is not None:
        check_number(ledger.target_epsilon, "target_epsilon")
    for i, e in enumerate(ledger.public_stages):
        if not isinstance(e, dict) or not isinstance(e.get("stage"), str) or not isinstance(e.get("data"), dict):
            raise ValueError(f"public stage {i} has no stage or data")
        check_number(e.get("steps"), f"public stage {i}'s steps", integer=True)


def format_ledger(ledger: Ledger, *, accountant: str | None = None) -> str:
    """The ledger as ``privdiff budget show`` prints it: the data set, one line per event and per public stage,
    and the composed ε at δ (also with ``accountant``, if given, for a finite ε)."""
    eps = ledger.epsilon()
    d = ledger.dataset
    lines = [f"dataset:  {d.get('name')} ({d.get('size')} examples, {d.get('fingerprint')})"]
    for e in ledger.events:
        lines.append(
            f"  {e.stage:<10} {e.mechanism:<20} sigma={e.noise_multiplier:.4f}  q={e.sample_rate:.5f}  "
            f"steps={e.steps}"
            + (f"  C={e.max_grad_norm}" if e.max_grad_norm else "")
            + (f"  sensitivity={e.sensitivity}" if e.sensitivity else "")
        )
    for p in ledger.public_stages:
        pd = p["data"]
        lines.append(
            f"  {p['stage']:<10} {'public data':<20} {pd.get('name')} ({pd.get('split')}, {pd.get('size')} examples)  "
            f"steps={p['steps']}  (not part of epsilon)"
        )
    lines.append(
        f"epsilon:  {'inf (non-private steps ran)' if math.isinf(eps) else f'{eps:.4f}'} at delta={ledger.delta} "
        f"({ledger.accountant}); target {ledger.target_epsilon}"
    )
    if accountant and not math.isinf(eps):
        other = compose_epsilon(ledger.history(), delta=ledger.delta, accountant=accountant)
        lines.append(f"          {other:.4f} with the {accountant} accountant")
    return "\n".join(lines)
