"""The list of privdiff's methods: the one place a method is named.

Recipe validation (:mod:`privdiff.config`), the command line (``privdiff train``) and the privacy
audit (``privdiff audit``) read :data:`METHODS`. An entry names its module rather than importing it,
so this table sits on the lowest floor (the recipe checker needs it) while the methods stand on
top of the core; :meth:`Method.train` imports the module when a method is run. Adding a method is
its file in ``privdiff/methods/``, its recipe, and one line here (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["METHODS", "Method", "get_method"]


@dataclass(frozen=True)
class Method:
    """One method: its recipe name, the module whose ``train(recipe, *, out, progress, ...)`` runs it, a one-line
    summary, the ledger stage of its private training, and whether ``privdiff audit`` can check it (its
    private training is one DP-SGD stage of the shared loop, and its ``train`` takes the canaries)."""

    name: str
    module: str
    summary: str
    private_stage: str = "dp_sgd"
    auditable: bool = False

    def load(self) -> ModuleType:
        """The method's module (imported now)."""
        return importlib.import_module(self.module)

    def train(self, recipe, **options: Any):
        """Run the method: ``module.train(recipe, **options)``; returns its :class:`~privdiff.core.stages.MethodResult`."""
        return self.load().train(recipe, **options)


_ALL = (  # one line per method: name, module, summary, its private stage, whether privdiff audit can check it
    Method("dpdm", "privdiff.methods.dpdm", "DP-SGD from scratch (Dockhorn et al. 2023)", auditable=True),
    Method("dp-ldm", "privdiff.methods.dp_ldm", "public LDM, DP-SGD on a part (Liu et al. 2024)", auditable=True),
    Method("dpp", "privdiff.methods.dpp", "central images, then DP-SGD (Li et al.)", auditable=True),
    Method("lora", "privdiff.methods.lora", "LoRA: plain, PrivateLoRA, Stable, DP-SGD", private_stage="lora"),
    Method("dp-finetune", "privdiff.methods.finetune", "DP-SGD fine-tuning of your diffusers UNet", auditable=True),
)
METHODS: dict[str, Method] = {m.name: m for m in _ALL}


def get_method(name: str) -> Method:
    """The method called ``name``; a ValueError naming the available ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"method '{name}' is not available (available: {', '.join(METHODS)})")
    return METHODS[name]
