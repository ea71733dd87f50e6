"""LoRA adapters (Hu et al. 2022) on privdiff's pixel UNet, with ``peft``.

W' = W + (α/r)·B·A on the named layers (attention q/k/v/out projections and the ResNet 3×3
convs by default); A is Kaiming-uniform, B zero, so the adapted model starts as the base model.
Only A and B train. A checkpoint directory holds the *merged* UNet (loadable with diffusers'
``UNet2DModel.from_pretrained``, so sampling, evaluation and attacks need nothing special) and,
under ``lora/``, the base UNet and the adapter weights, from which training resumes exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from .unet import UNetNet

__all__ = ["LoRASpec", "LoRAUNetNet", "lora_parameters"]

ADAPTER = "default"


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 8
    alpha: float = 4.0  # scale α/r
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


class LoRAUNetNet(UNetNet):
    """A :class:`UNetNet` whose UNet carries peft LoRA adapters; only the adapters are trainable."""

    def __init__(self, unet: UNet2DModel, spec: LoRASpec, *, inject: bool = True):
        if inject:
            config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0)
            unet = inject_adapter_in_model(config, unet)
        super().__init__(unet)
        self.spec = spec
        if not any(isinstance(m, LoraLayer) for m in unet.modules()):
            raise ValueError(f"lora.targets {list(spec.targets)} match no layer of the UNet")

    @classmethod
    def from_base(cls, base: UNetNet, spec: LoRASpec) -> "LoRAUNetNet":
        """Adapters on a copy of ``base``'s UNet; everything but A and B frozen."""
        unet = UNet2DModel.from_config(base.unet.config)
        unet.load_state_dict(base.unet.state_dict())
        net = cls(unet, spec)
        net.requires_grad_(False)
        for p in lora_parameters(net):
            p.requires_grad_(True)
        return net

    def _base_and_merged(self) -> tuple[dict, dict]:
        """State dicts of the plain UNet: without the adapters (W) and with them merged (W + (α/r)·BA)."""
        base, merged = {}, {}
        lora = {n: m for n, m in self.unet.named_modules() if isinstance(m, LoraLayer)}
        for k, v in self.unet.state_dict().items():
            if ".lora_" in k:
                continue
            plain = k.replace(".base_layer.", ".")
            base[plain] = v.detach().clone()
            merged[plain] = v.detach().clone()
        for n, m in lora.items():
            merged[f"{n}.weight"] += m.get_delta_weight(ADAPTER).detach()
        return base, merged

    def save_pretrained(self, path) -> None:
        path = Path(path)
        base, merged = self._base_and_merged()
        for state, where in ((merged, path), (base, path / "lora" / "base")):
            plain = UNet2DModel.from_config(self.unet.config)
            plain.load_state_dict(state)
            plain.save_pretrained(where, safe_serialization=True)
        adapter = {k: v.contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
        save_file(adapter, path / "lora" / "adapter.safetensors")
        (path / "lora" / "adapter.json").write_text(json.dumps(asdict(self.spec), indent=2))

    @classmethod
    def from_pretrained(cls, path) -> "LoRAUNetNet":
        path = Path(path)
        spec = LoRASpec(
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in json.loads((path / "lora" / "adapter.json").read_text()).items()
            }
        )
        base = UNet2DModel.from_pretrained(
            path / "lora" / "base", local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
        )
        net = cls(base, spec)
        result = set_peft_model_state_dict(net.unet, load_file(path / "lora" / "adapter.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{path}: adapter has unexpected keys {result.unexpected_keys[:3]}")
        return net


def lora_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA A and B matrices of ``net``."""
    return [p for n, p in net.named_parameters() if ".lora_A." in n or ".lora_B." in n]
