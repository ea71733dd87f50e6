"""Cost of one DP-SGD step over one non-private step when fine-tuning a Stable-Diffusion-1.5-shaped UNet.

The UNet is built from the SD 1.5 config (``UNet2DConditionModel``: channels 320/640/1280/1280,
cross-attention 768, 8 heads) with random weights: nothing is downloaded. ``--scale`` divides its
widths (attention heads kept) for a quicker look on a small machine. The text condition is a fixed
random [77, 768] hidden state per example: the frozen text encoder is outside what is clipped.

For each trainable choice (attention blocks, LoRA rank 4 and 64 on the attention projections, the
whole UNet), privdiff's DP-SGD step (book-keeping clipping, Poisson batch of expected size B, K
draws) and the non-private step on the same model, batch and loss run interleaved in one process
(median of ``--repeats`` after one warm-up each), so the ratio is robust to a shared machine's
drift. ``--memory`` also measures each path's peak resident memory in its own subprocess (on a GPU:
the CUDA allocator's peak).

    .venv/bin/python -W ignore benchmarks/pretrained_step.py --latent 32 --batch 2 --repeats 3
    .venv/bin/python -W ignore benchmarks/pretrained_step.py --scale 4 --latent 32 --batch 4 --memory

The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from privdiff.diffusion import denoising_loss, draw_training_noise
from privdiff.diffusion.discrete import DiscreteSchedule, DiscreteSigma, VPDenoiser
from privdiff.models.pretrained import DiffusersUNetNet, add_lora, select_trainable
from privdiff.privacy.dpsgd import DPSGD, NonPrivateSGD
from sd15 import scaled

CHOICES = ("attentions", "lora-4", "lora-64", "all")


class _Prompted(DiffusersUNetNet):
    """The UNet conditioned on a fixed random text hidden state per example (``cond`` = example index per draw)."""

    def __init__(self, unet, schedule, hidden: torch.Tensor):
        super().__init__(unet, schedule)
        self.register_buffer("hidden", hidden, persistent=False)

    def forward(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=self.hidden[cond.long()]).sample


def build(choice: str, *, scale: int, latent: int, batch: int, K: int, private: bool, device: torch.device):
    """A fresh SD-1.5-shaped net with ``choice`` trainable and its engine; returns (step function, trainable count)."""
    torch.manual_seed(0)
    cfg = scaled(scale, sample_size=latent, norm_num_groups=32 // scale if scale > 1 else 32)
    unet = UNet2DConditionModel(**cfg)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, 77, 768, generator=g)
    schedule = DiscreteSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    net = _Prompted(unet, schedule, hidden)
    if choice.startswith("lora"):
        add_lora(
            net,
            rank=int(choice.split("-")[1]),
            alpha=float(choice.split("-")[1]),
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    else:
        select_trainable(net, [choice])
    den = VPDenoiser(net.to(device), schedule=schedule)
    opt = torch.optim.Adam([p for p in den.parameters() if p.requires_grad], lr=1e-5)
    common = dict(
        num_examples=10 * batch,
        batch_size=batch,
        noise_multiplicity=K,
        max_physical_batch_size=batch * K,
        generator=torch.Generator().manual_seed(2),
    )
    eng = (
        DPSGD(
            den,
            opt,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_generator=torch.Generator(device=device).manual_seed(3),
            grad_sample_mode="bk",
            **common,
        )
        if private
        else NonPrivateSGD(den, opt, **common)
    )
    x0 = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    sigmas, gd = DiscreteSigma(schedule), torch.Generator(device=device).manual_seed(4)

    def loss_fn(module, idx):
        idx = idx.to(device)
        sigma, noise = draw_training_noise(x0[idx], K=K, sigma_dist=sigmas, generator=gd)
        return denoising_loss(
            module, x0[idx], idx[:, None].expand(-1, K), sigma=sigma, noise=noise, loss_weight=den.loss_weight
        )

    full = torch.arange(batch)  # the same examples every step (Poisson's variable batch would blur the ratio)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step(full, loss_fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step, sum(p.numel() for p in den.parameters() if p.requires_grad), sum(p.numel() for p in den.parameters())


def _memory(args, choice: str, private: bool) -> float:
    """Peak memory (GiB) of two steps of one path, in a fresh subprocess of this script."""
    cmd = [
        sys.executable,
        "-W",
        "ignore",
        __file__,
        "--choices",
        choice,
        "--scale",
        str(args.scale),
        "--latent",
        str(args.latent),
        "--batch",
        str(args.batch),
        "--K",
        str(args.K),
        "--peak-of",
        "dp" if private else "plain",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak(choice, scale, latent, batch, K, private) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, _, _ = build(choice, scale=scale, latent=latent, batch=batch, K=K, private=private, device=device)
    step(), step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--choices", nargs="+", default=list(CHOICES), choices=CHOICES)
    p.add_argument("--scale", type=int, default=1, help="divide the SD 1.5 widths by this (1: the real config)")
    p.add_argument("--latent", type=int, default=32, help="latent side (SD at 256 px: 32; at 512 px: 64)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--K", type=int, default=1, help="noise draws per example")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="also each path's peak memory, in its own subprocess")
    p.add_argument("--peak-of", choices=["plain", "dp"], help=argparse.SUPPRESS)  # _memory's subprocess
    args = p.parse_args()
    if args.peak_of:
        print(json.dumps(_peak(args.choices[0], args.scale, args.latent, args.batch, args.K, args.peak_of == "dp")))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"SD 1.5 UNet config / {args.scale}, latents 4x{args.latent}x{args.latent}, batch {args.batch}, K={args.K}, "
        f"{device} ({torch.get_num_threads()} threads), median of {args.repeats} interleaved steps after one warm-up"
    )
    print(
        "| trainable | trainable params | non-private step | DP step (bk) | DP / non-private |"
        + (" peak memory non-private / DP |" if args.memory else "")
    )
    print("|---|---|---|---|---|" + ("---|" if args.memory else ""))
    for choice in args.choices:
        plain, n, total = build(
            choice, scale=args.scale, latent=args.latent, batch=args.batch, K=args.K, private=False, device=device
        )
        dp, _, _ = build(
            choice, scale=args.scale, latent=args.latent, batch=args.batch, K=args.K, private=True, device=device
        )
        plain(), dp()
        times = {"plain": [], "dp": []}
        for _ in range(args.repeats):
            times["plain"].append(plain())
            times["dp"].append(dp())
        a, b = statistics.median(times["plain"]), statistics.median(times["dp"])
        mem = ""
        if args.memory:
            mem = f" {_memory(args, choice, False):.2f} / {_memory(args, choice, True):.2f} GiB |"
        print(
            f"| {choice} | {n:,} of {total:,} ({n / total:.1%}) | {a:.2f} s | {b:.2f} s | {b / a:.2f}x |" + mem,
            flush=True,
        )
        del plain, dp


if __name__ == "__main__":
    main()
