"""Test helpers shared across test files (one place; no test file imports another).

Per-example clipping against the slow, obvious reference: each example's K rows alone through a
plain copy of the model, its flat gradient norm, clipped, summed (relative error ≤ TOL).
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import dp_accounting
import numpy as np
import torch
from diffusers import UNet2DModel
from dp_accounting import rdp
from PIL import Image
from torch import Tensor, nn

from privdiff.data import ImageDataset
from privdiff.diffusion import Denoiser, LogNormalSigma, denoising_loss, draw_training_noise
from privdiff.models.he_net import HENetConfig, build_he_net
from privdiff.models.text import TextConfig, build_text_encoder
from privdiff.privacy.accounting import RDP_ORDERS
from privdiff.privacy.clipping import BookKeeping

TOL = 1e-4
DELTA = 1e-5


def jitter(model: nn.Module, seed: int) -> nn.Module:
    """Move every weight off its (often 0 or 1) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def reference(model: nn.Module, row_loss, B: int, C: float):
    """Each example's K rows alone through the model; flat gradient norm; clip; sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms, total = [], [torch.zeros_like(p) for p in params]
    for b in range(B):
        model.zero_grad(set_to_none=True)
        row_loss(model, b).sum().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        n = torch.sqrt(sum(g.double().square().sum() for g in grads)).float()
        c = min(1.0, C / (float(n) + 1e-6))
        norms.append(n)
        total = [t + c * g for t, g in zip(total, grads)]
    model.zero_grad(set_to_none=True)
    return torch.stack(norms), total


def bookkeeping(model: nn.Module, batch_loss, K: int, C: float):
    bk = BookKeeping(model, noise_multiplicity=K, max_grad_norm=C)
    with bk.recording():
        loss = batch_loss(model)
    norms = bk.clipped_backward(loss)
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    bk.remove()
    return norms, grads


def assert_same(model, batch_loss, row_loss, B, K, C):
    ref_norms, ref_sum = reference(model, row_loss, B, C)
    bk_norms, bk_sum = bookkeeping(model, batch_loss, K, C)
    torch.testing.assert_close(bk_norms, ref_norms, rtol=TOL, atol=0)
    flat_ref, flat_bk = torch.cat([t.flatten() for t in ref_sum]), torch.cat([t.flatten() for t in bk_sum])
    assert float((flat_bk - flat_ref).norm() / flat_ref.norm()) <= TOL
    scale = float(flat_ref.abs().max())
    for r, b in zip(ref_sum, bk_sum):  # per parameter, with a floor for analytically-zero gradients (to_k.bias)
        assert float((b - r).abs().max()) <= TOL * max(float(r.abs().max()), 1e-3 * scale)
    return ref_norms


def assert_latent_net_same(net: nn.Module, K: int, *, B: int = 4, C: float = 1e-2, seed: int = 4) -> None:
    """:func:`assert_same` on a text-conditioned latent network (DP-LDM's ``LatentNet`` or the HE-friendly
    ``HENet``, trainable subset already selected): B latents, K noise draws each, conditions with labels
    and captions of the digit class names."""
    from privdiff.data.captions import caption

    den = Denoiser(net, sigma_data=1.0)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *net.sample_shape, generator=g)
    sigma, noise = draw_training_noise(x0, K=K, sigma_dist=LogNormalSigma(), generator=g)
    cond = net.conditions(
        labels=torch.randint(0, 10, (B * K,), generator=g),
        prompts=[caption(str(i % 10)) for i in range(B * K)],
        n=B * K,
    )
    cond = cond.view(B, K, -1)

    def batch_loss(m):
        return denoising_loss(m, x0, cond, sigma=sigma, noise=noise, loss_weight=den.loss_weight)

    def row_loss(m, b):
        return denoising_loss(
            m,
            x0[b : b + 1],
            cond[b : b + 1],
            sigma=sigma[b : b + 1],
            noise=noise[b : b + 1],
            loss_weight=den.loss_weight,
        )

    assert_same(den, batch_loss, row_loss, B, K, C)


# -- accountant references (dp-accounting) --------------------------------------------------------


def sgm_event(sigma: float, q: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def composed(history) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([sgm_event(*h) for h in history])


def dp_accounting_rdp(history, delta=DELTA, orders=RDP_ORDERS) -> float:
    acc = rdp.RdpAccountant(orders=list(orders))
    acc.compose(composed(history))
    return acc.get_epsilon(delta)


# -- a tiny HE-friendly denoiser ------------------------------------------------------------------

NAMES = tuple(str(d) for d in range(10))


def tiny_he_net(
    seed: int = 0, config: HENetConfig = HENetConfig(width=32, blocks=1, heads=2, head_dim=8, mlp_ratio=2, fourier=4)
):
    """A tiny HE-friendly denoiser (H = 32, one block) on 4×4×4 latents with fresh random weights of a trained-like size
    (also the model of tests/he's encrypted evaluations)."""
    torch.manual_seed(seed)
    te = build_text_encoder(TextConfig(width=16, layers=1, heads=2), class_names=(NAMES,))
    net = build_he_net(config, te, latent_channels=4, latent_size=4, num_classes=10).eval()
    with torch.no_grad():  # not the init's small weights
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


# -- a tiny Stable-Diffusion-layout pipeline, built from configs (nothing downloaded) -----------------


def tiny_sd_unet(seed: int = 0, *, layout: str = "sd1"):
    """A Stable-Diffusion-layout latent UNet (cross-attention blocks: Transformer2DModel with GEGLU feed-forward) on
    4x8x8 latents. ``layout="sd2"``: SD 2.x's differences (linear proj_in/proj_out, a head size per level,
    attention upcast to float32)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    sd2 = layout == "sd2"
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=(2, 4) if sd2 else 4,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=4,
    )


def tiny_sd_pipeline(path, *, prediction_type: str = "epsilon", seed: int = 0, layout: str = "sd1"):
    """Save a tiny StableDiffusionPipeline (:func:`tiny_sd_unet`, AutoencoderKL, CLIP text encoder with a
    character-level tokenizer written here) to ``path``; returns the pipeline. ``layout="sd1"``: a DDIM scheduler,
    quick-GELU text encoder; ``"sd2"``: SD 2.x's UNet, an Euler scheduler and a GELU text encoder (OpenCLIP's)."""
    import json
    import string
    from pathlib import Path

    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok_dir = path.parent / f".{path.name}-tokenizer-source"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=8)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=12,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="gelu" if layout == "sd2" else "quick_gelu",
        )
    )
    unet = tiny_sd_unet(seed, layout=layout)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    if layout == "sd2":
        scheduler = EulerDiscreteScheduler(**common)
    else:
        scheduler = DDIMScheduler(**common, clip_sample=False)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return pipe


def image_folder(
    root: Path, rng: np.random.Generator, *, classes: dict[str, int], mode: str = "L", size: int = 8
) -> Path:
    """A user's class folder: one sub-folder per class of fresh random PNGs (``mode`` "L" or "RGB", ``size``²)."""
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def zip_folder(folder: Path, path: Path) -> Path:
    """``folder`` zipped as a user would (its files under one top folder of the archive)."""
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.rglob("*.png")):
            zf.write(file, folder.name + "/" + file.relative_to(folder).as_posix())
    return path


def tiny_pixel_unet(seed: int = 0, *, classes: int | None = 3) -> UNet2DModel:
    """A DDPM-style pixel UNet (8x8, 1 channel) with attention and, unless ``classes=None``, a class embedding,
    as diffusers' own tests build dummies."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        num_class_embeds=classes,
    )


def toy_dataset(n: int, seed: int, *, num_classes: int = 10, size: int = 8) -> ImageDataset:
    """``n`` fresh random 1-channel images in [-1, 1] with random labels, fingerprinted by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(
        images=torch.rand(n, 1, size, size, generator=g) * 2 - 1,
        labels=torch.randint(0, num_classes, (n,), generator=g),
        num_classes=num_classes,
        name="toy",
        split="train",
        fingerprint=f"sha256:toy{seed}",
    )


# -- tiny recipe overrides for end-to-end tests -------------------------------------------------

TINY = [
    "model.channels=[8,16]",
    "model.attention_levels=[1]",
    "model.norm_num_groups=4",
    "model.attention_head_dim=4",
    "data.resolution=8",
    "train.batch_size=32",
    "train.epochs=1",
    "privacy.noise_multiplicity=2",
    "train.max_physical_batch_size=32",
    "sampler.steps=4",
]


# the smallest DPDM: a one-level UNet on 4x4 digits (scikit-learn's), a run in a few seconds; tests add
# their train.max_steps / train.checkpoint_every
MICRO = [
    "data.name=digits",
    "data.resolution=4",
    "model.channels=[4]",
    "model.attention_levels=[]",
    "model.norm_num_groups=2",
    "model.attention_head_dim=4",
    "train.batch_size=8",
    "train.epochs=1",
    "privacy.noise_multiplicity=1",
    "train.max_physical_batch_size=64",
    "sampler.steps=1",
]


# -- one set of images exported the ways a user holds them (IDX, a class folder, a zip) ----------


def random_digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fresh random 28×28 gray images ``[n, 28, 28]`` uint8 and labels 0..9 (every class present when n >= 10)."""
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.concatenate([np.arange(10), rng.integers(0, 10, size=max(0, n - 10))])[:n].astype(np.uint8)
    return images, labels


def write_idx(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """``root/train-images-idx3-ubyte`` and ``root/train-labels-idx1-ubyte`` (what ``data.name=mnist`` reads)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
        (root / name).write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return root


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, *, mode: str = "L") -> Path:
    """``root/<label>/<i>.png``, each image as a PNG of ``mode`` ("L", or "RGB" with three equal channels)."""
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert(mode).save(root / str(int(label)) / f"{i:05d}.png")
    return root


def write_zip(folder: Path, path: Path) -> Path:
    """``folder`` zipped as a user would (its files under one top folder of the archive)."""
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.rglob("*.png")):
            zf.write(file, folder.name + "/" + file.relative_to(folder).as_posix())
    return path


# -- tiny nets and the exact Gaussian denoiser for the diffusion tests ---------------------------


class TinyNet(nn.Module):
    """A small conditional F(x_in; c_noise, labels) made of Opacus-supported layers."""

    def __init__(self, channels: int = 2, num_classes: int = 5, hidden: int = 4) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.noise_emb = nn.Linear(1, hidden)
        self.label_emb = nn.Embedding(num_classes + 1, hidden)  # last index = null label
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x_in: Tensor, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        h = self.conv_in(x_in) + self.noise_emb(c_noise[:, None])[:, :, None, None]
        if labels is not None:
            h = h + self.label_emb(labels)[:, :, None, None]
        return self.conv_out(torch.tanh(h))


class RecordingNet(nn.Module):
    """F = a·x_in + b·c_noise (+ 0.1·label) that records every call's inputs."""

    def __init__(self, a: float = 0.7, b: float = -0.4) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, x_in: Tensor, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        self.calls.append((x_in.detach().clone(), c_noise.detach().clone(), None if labels is None else labels.clone()))
        out = self.a * x_in + self.b * c_noise.view(-1, 1, 1, 1)
        if labels is not None:
            out = out + 0.1 * labels.to(x_in.dtype).view(-1, 1, 1, 1)
        return out


class GaussianDenoiser:
    """Exact denoiser for data x ~ N(mu, s^2) per pixel: D(x; σ) = mu + s²/(s²+σ²)·(x − mu)."""

    def __init__(self, mu: float = 0.3, s: float = 0.5) -> None:
        self.mu, self.s = mu, s
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        assert sigma.shape == (x.shape[0],), sigma.shape
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    def ode_solution(self, x_T: Tensor, *, sigma_max: float, sigma: float = 0.0) -> Tensor:
        """Exact PF-ODE solution x(σ) = mu + √(s²+σ²)/√(s²+σ_max²)·(x_T − mu)."""
        s = self.s
        return self.mu + ((s**2 + sigma**2) / (s**2 + sigma_max**2)) ** 0.5 * (x_T - self.mu)
