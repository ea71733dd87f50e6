"""Privacy events as values: what touched private data, in the style of dp-accounting's ``DpEvent``s.

A :class:`Release` is ``steps`` executions of one mechanism on the private data of a run: the
subsampled Gaussian mechanism of DP-SGD (noise multiplier σ, Poisson rate q, clip norm C) or of
DPP's central-image release (σ, q, L2 sensitivity Δ), or a non-private step (ε = ∞). The ledger,
the budget registry, the plans a run reserves before it starts and DPP's release all speak in
Releases; on disk (``ledger.json``, the registry's rows) a Release is the same JSON object with the
same keys as always, so anyone can recompute ε from the file with
:func:`privdiff.privacy.accounting.epsilon`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["MECHANISMS", "NON_PRIVATE", "SUBSAMPLED_GAUSSIAN", "Release", "check_number"]

SUBSAMPLED_GAUSSIAN = "subsampled_gaussian"
NON_PRIVATE = "non_private"
MECHANISMS = (SUBSAMPLED_GAUSSIAN, NON_PRIVATE)


def check_number(x: Any, what: str, *, low: float = 0.0, high: float = math.inf, integer: bool = False) -> None:
    """``x`` is a finite number (an integer if ``integer``) in [low, high], not a bool; else ValueError('``what`` is x')."""
    ok = (
        isinstance(x, int if integer else (int, float))
        and not isinstance(x, bool)
        and math.isfinite(x)
        and low <= x <= high
    )
    if not ok:
        raise ValueError(f"{what} is {x!r}")


@dataclass(frozen=True)
class Release:
    """``steps`` executions, in stage ``stage``, of a mechanism on the private data.

    Attributes:
        stage: the run's stage that executed it (``dp_sgd``, ``central_images``, ``lora``).
        mechanism: :data:`SUBSAMPLED_GAUSSIAN` or :data:`NON_PRIVATE`.
        noise_multiplier: σ, the noise's standard deviation over the sensitivity (0 when non-private).
        sample_rate: q, each example's Poisson inclusion probability per execution.
        steps: how many executions.
        max_grad_norm: C, the clip norm DP-SGD applied (the sensitivity of one step), or None.
        sensitivity: Δ, the L2 sensitivity of a release that is not clipped gradients (DPP), or None.
    """

    stage: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int = 1
    max_grad_norm: float | None = None
    sensitivity: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or not self.stage:
            raise ValueError(f"a release's stage is {self.stage!r}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(
                f"stage {self.stage}: unknown mechanism {self.mechanism!r} (known: {', '.join(MECHANISMS)})"
            )
        check_number(self.noise_multiplier, f"stage {self.stage}'s noise_multiplier")
        check_number(self.sample_rate, f"stage {self.stage}'s sample_rate", high=1.0)
        check_number(self.steps, f"stage {self.stage}'s steps", integer=True)
        for name in ("max_grad_norm", "sensitivity"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), f"stage {self.stage}'s {name}")
        # one representation on disk and in comparisons: floats as floats
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        for name in ("max_grad_norm", "sensitivity"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def private(self) -> bool:
        return self.mechanism != NON_PRIVATE

    @property
    def triple(self) -> tuple[float, float, int]:
        """``(σ, q, steps)``: what the accountant composes."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def same_mechanism(self, other: Release) -> bool:
        """Everything but the step count is equal: ``other``'s steps are more executions of this one."""
        return dataclasses.replace(self, steps=other.steps) == other

    def with_steps(self, steps: int) -> Release:
        return dataclasses.replace(self, steps=steps)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``ledger.json`` (keys as always)."""
        return {
            "stage": self.stage,
            "mechanism": self.mechanism,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "sensitivity": self.sensitivity,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Release:
        """A Release from its JSON object (unknown keys are an error: a ledger is never half-read)."""
        if not isinstance(d, dict):
            raise ValueError(f"a release is a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"a release has unknown fields {sorted(unknown)}")
        return cls(**d)
