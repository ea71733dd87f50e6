"""``privdiff export RUN --out DIR``: a fine-tuned pretrained model back in plain diffusers.

A run that fine-tuned a user's diffusers model (method ``dp-finetune``) exports its EMA UNet in the
layout it came in:

* from a pipeline: a pipeline directory (``DiffusionPipeline.from_pretrained(DIR)``); a LoRA run's
  adapters are merged into its UNet and also written alone to ``DIR/lora`` (``pipe.load_lora_weights``);
* from a UNet directory: a UNet directory with its scheduler config (``UNet2DModel.from_pretrained(DIR)``).

Exporting reads no private data and changes no ε: it is post-processing of the released checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ..models.pretrained import DiffusersUNetNet, export_lora, export_pipeline, export_unet
from ..runs import Run, RunError

__all__ = ["export_run"]


def export_run(run_dir: str | Path, *, out: str | Path) -> Path:
    """Write run ``run_dir``'s EMA model to ``out`` as plain diffusers (see the module docstring); returns ``out``."""
    run = Run(run_dir)
    recipe = run.load_config()
    if run.latest_checkpoint() is None:
        raise RunError(f"{run.path}: no checkpoint to export (has the run started?)")
    net = run.load_net(ema=True)
    if not isinstance(net, DiffusersUNetNet) or not recipe.model.pretrained:
        raise RunError(
            f"{run.path}: only runs that fine-tuned a pretrained diffusers model export (method dp-finetune); "
            "this run's checkpoints are already diffusers directories: RUN/checkpoints/latest/unet_ema"
        )
    base = Path(recipe.model.pretrained)
    if not base.is_dir():
        raise RunError(f"model.pretrained={base}: not found; the export copies its other components (restore it)")
    if (base / "model_index.json").is_file():
        written = export_pipeline(net, base=base, out=out)  # LoRA adapters merged into its UNet
        if net.lora:  # and the adapters alone, in the diffusers LoRA format: pipe.load_lora_weights(OUT/lora)
            export_lora(net, out=Path(out) / "lora")
        return written
    return export_unet(net, base=base, out=out)
