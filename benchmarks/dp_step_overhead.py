"""Cost of one DP-SGD step over one non-private step, same UNet, loss and batch, per clipping path.

Paths: Opacus' per-sample gradients with hooks (privdiff's conv fix) and with functorch, and
privdiff's one-backward book-keeping clipping (``bk``). Timing runs every path side by side in
one process (interleaved repeats, median), so ratios are robust to a shared machine's drift.
Memory is measured in each path's own subprocess: the resident-set peak of its first three steps
over the resident set before them (model and data allocated), and the
per-example gradient state the clipping holds (Opacus: ``grad_sample`` for B·K rows; bk: the
[B, ...] per-example gradients of its direct layers).

    .venv/bin/python -W ignore benchmarks/dp_step_overhead.py --batch 64 256 --repeats 5
    .venv/bin/python -W ignore benchmarks/dp_step_overhead.py --batch 256 privacy.noise_multiplicity=4
    .venv/bin/python -W ignore benchmarks/dp_step_overhead.py --batch 250 --modes bk \
        --recipe recipes/dpdm-mnist5k.yaml recipes/dpdm-mnist5k.yaml@data.resolution=28 recipes/dp-ldm-mnist5k.yaml

``--sizes`` prints issue 21's table instead: fixed model sizes (not a recipe's, which may change)
and their rows of batch × K, each path in fp32 and (``--precision``) under bf16 autocast, with
images per second, and on a GPU the CUDA allocator's peak per step:

    python3 benchmarks/dp_step_overhead.py --sizes demo dpdm large sd15         # on a GPU: the whole table
    .venv/bin/python -W ignore benchmarks/dp_step_overhead.py --sizes demo --rows 256x1 --modes bk   # CPU

On a GPU everything is device-resident (model, data, the per-step draws, the noise generator),
each timed step is bracketed by ``torch.cuda.synchronize()``, and the paths of a row still run
interleaved. ``sd15`` is a UNet built from Stable Diffusion 1.5's config (benchmarks/sd15.py;
random weights, every parameter trainable, a fixed random [77, 768] text state per example) on
4×``--sd-latent``² latents; Opacus' paths are not run on it (their per-sample gradients of 860M
parameters do not fit).

The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from privdiff.config import resolve_recipe
from privdiff.diffusion import denoising_loss, draw_training_noise, make_sigma_distribution
from privdiff.core.denoisers import make_denoiser
from privdiff.data import ImageDataset
from privdiff.methods.dp_ldm import caption_conditioner
from privdiff.models import build_unet, count_parameters
from privdiff.models.latent import build_latent_net, select_trainable
from privdiff.models.text import build_text_encoder
from privdiff.privacy.dpsgd import DPSGD, NonPrivateSGD
from privdiff.runtime import keep_freed_memory

MODES = ("non-private", "hooks", "functorch", "bk")
BF16_MODES = ("non-private", "bk")  # Opacus' per-sample gradients are not run under autocast (train.precision)

# issue 21's models: (recipe overrides, rows of batch x K); resolution is data.resolution
SIZES = {
    "demo": (
        ["model.channels=[16,32]", "model.attention_levels=[]", "model.layers_per_block=1", "data.resolution=16"],
        [(256, 1), (1024, 1)],
    ),
    "dpdm": (
        ["model.channels=[32,64,64]", "model.attention_levels=[2]", "model.layers_per_block=1", "data.resolution=28"],
        [(256, 1), (1024, 1), (256, 8)],
    ),
    "large": (
        [
            "model.channels=[64,128,128]",
            "model.attention_levels=[1,2]",
            "model.layers_per_block=1",
            "data.resolution=32",
        ],
        [(1024, 1)],
    ),
    "sd15": ([], [(8, 1)]),
}


def _model_and_batch(r, batch: int, g: torch.Generator, device: torch.device):
    """The recipe's network (fresh weights; DP-LDM: only ``ldm.trainable`` trainable), a fixed batch and its conditions, on ``device``."""
    res = r.data.resolution or 28
    if r.method != "dp-ldm":
        net = build_unet(r.model, resolution=res, in_channels=1, num_classes=10)
        x0 = (torch.rand(batch, 1, res, res, generator=g) * 2 - 1).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        attn = f" attn@{','.join(map(str, r.model.attention_levels))}" if r.model.attention_levels else ""
        return net, x0, lambda i, K, gen: y[i][:, None].expand(-1, K), f"UNet {list(r.model.channels)}{attn} @ {res}px"
    L = r.ldm
    names = tuple(str(d) for d in range(10))
    text = build_text_encoder(L.text, class_names=(names,))
    tok = text.tokenizer
    size = res // 2 ** (len(L.autoencoder.channels) - 1)
    net = build_latent_net(
        L.unet, text, latent_channels=L.autoencoder.latent_channels, latent_size=size, num_classes=10
    )
    n, total = select_trainable(net, L.trainable)
    x0 = torch.randn(batch, L.autoencoder.latent_channels, size, size, generator=g)
    data = ImageDataset(
        images=x0.to(device),
        labels=torch.randint(0, 10, (batch,), generator=g),
        num_classes=10,
        name="bench",
        split="train",
        fingerprint="sha256:0",
        class_names=names,
    )
    desc = (
        f"DP-LDM latent UNet {list(L.unet.channels)} @ {L.autoencoder.latent_channels}x{size}x{size}, "
        f"trainable {', '.join(L.trainable)} = {n:,} of {total:,} ({n / total:.1%})"
    )
    return net, x0.to(device), caption_conditioner(data, r, tok, device), desc


def _sd15(batch: int, latent: int, g: torch.Generator, device: torch.device, scale: int = 1):
    """A UNet of Stable Diffusion 1.5's config (random weights, all trainable) as a VP denoiser, latents and conditions."""
    from diffusers import UNet2DConditionModel
    from pretrained_step import _Prompted  # the UNet with a fixed random text state per example
    from sd15 import scaled

    from privdiff.diffusion.discrete import DiscreteSchedule, DiscreteSigma, VPDenoiser

    hidden = torch.randn(batch, 77, 768, generator=g)
    with torch.device(device):  # initialised where it trains (860M random weights: seconds on a CPU)
        unet = UNet2DConditionModel(**scaled(scale, sample_size=latent, norm_num_groups=32 // scale))
    schedule = DiscreteSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    net = _Prompted(unet, schedule, hidden)
    den = VPDenoiser(net, schedule=schedule)
    x0 = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    desc = f"SD 1.5 UNet{f' / {scale}' if scale > 1 else ''} (all trainable) @ 4x{latent}x{latent}"
    return den, x0, lambda i, K, gen: i[:, None].expand(-1, K), desc, DiscreteSigma(schedule)


def build(
    r,
    mode: str,
    batch: int,
    *,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    sd_latent: int = 0,
    sd_scale: int = 1,
):
    """A fresh model and engine for ``mode`` on ``device``, the step function on a fixed random batch (it returns
    its wall time, synchronised on a GPU), and the model's description. ``sd_latent`` > 0: the SD 1.5 UNet instead."""
    K = r.privacy.noise_multiplicity
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if sd_latent:
        den, x0, condition, desc, sigma_dist = _sd15(batch, sd_latent, g, device, sd_scale)
    else:
        net, x0, condition, desc = _model_and_batch(r, batch, g, device)
        sigma_dist = make_sigma_distribution("lognormal")
        den = make_denoiser(r, net)
    den.to(device)
    gd = torch.Generator(device=device).manual_seed(3)  # the per-step draws, on the device
    idx = torch.arange(batch)
    opt = torch.optim.Adam([p for p in den.parameters() if p.requires_grad], lr=r.train.lr)
    common = dict(
        num_examples=10 * batch,
        batch_size=batch,
        noise_multiplicity=K,
        max_physical_batch_size=r.train.max_physical_batch_size,
        generator=torch.Generator().manual_seed(1),
        precision=precision,
    )
    if mode == "non-private":
        eng = NonPrivateSGD(den, opt, **common)
    else:
        eng = DPSGD(
            den,
            opt,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            noise_generator=torch.Generator(device=device).manual_seed(2),
            **common,
        )

    def loss_fn(module, i):
        i = i.to(device, non_blocking=True)
        s, n = draw_training_noise(x0[i], K=K, sigma_dist=sigma_dist, generator=gd)
        return denoising_loss(module, x0[i], condition(i, K, gd), sigma=s, noise=n, loss_weight=den.loss_weight)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        sync()
        t = time.perf_counter()
        eng.step(idx, loss_fn)
        sync()
        return time.perf_counter() - t

    return den, step, desc


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024  # kB


def child(args, r) -> None:
    """Memory of one path in a fresh process: the RSS peak of two steps over the RSS before them, and
    the per-example gradient state the clipping holds (Opacus: grad_sample of B·K rows; bk: [B, ...])."""
    import privdiff.privacy.clipping as bk
    import privdiff.privacy.dpsgd as dpsgd

    state = [0]
    fold = dpsgd.fold_noise_multiplicity

    def fold_and_measure(module, K):
        state[0] = max(
            state[0],
            sum(
                p.grad_sample.numel() * p.grad_sample.element_size()
                for p in module.parameters()
                if getattr(p, "grad_sample", None) is not None
            ),
        )
        fold(module, K)

    clipped_sum = bk._clipped_sum
    held = []

    def clipped_sum_and_measure(layer, c):
        held.append(sum(t.numel() * t.element_size() for t in (*layer.direct.values(), *layer.small.values())))
        return clipped_sum(layer, c)

    dpsgd.fold_noise_multiplicity, bk._clipped_sum = fold_and_measure, clipped_sum_and_measure
    device = _device()
    _, step, _ = build(r, args.child, args.batch[0], device=device)
    if device.type == "cuda":  # the CUDA allocator's peak over what the model and data hold
        step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        held.clear()
        step()
        per_example = max(state[0], sum(held))
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        print(json.dumps({"step_mib": peak, "per_example_mib": per_example / 2**20}))
        return
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) of this process
        f.write("5")
    before = _status_mib("VmRSS")
    for _ in range(3):
        held.clear()
        step()
    per_example = max(state[0], sum(held))
    print(json.dumps({"step_mib": _status_mib("VmHWM") - before, "per_example_mib": per_example / 2**20}))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_step_mib(step, device: torch.device) -> float:
    """The CUDA allocator's peak during one step over what was allocated before it (nan on CPU)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _rate(images_per_s: float) -> str:
    return f"{images_per_s:,.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def table(args) -> None:
    """Issue 21's table: per model size and row (batch x K), each path's step time in fp32 and bf16."""
    device = _device()
    rows = [tuple(int(v) for v in row.lower().split("x")) for row in args.rows] if args.rows else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{name}, torch {torch.__version__}; median of {args.repeats} interleaved steps after {args.warmup} warm-ups; "
        "ratios are over the non-private step of the same model, batch and precision; peak: the CUDA allocator's "
        "peak in one step over what was allocated before it"
    )
    print(
        "| model | params | batch × K | precision | non-private | img/s | Opacus hooks | Opacus functorch | privdiff bk "
        "| bk img/s | peak MiB non-private / bk | bf16 speed-up non-private / bk |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        overrides, preset = SIZES[size]
        for batch, K in rows or preset:
            r = resolve_recipe(
                None,
                [*overrides, f"privacy.noise_multiplicity={K}", f"train.max_physical_batch_size={batch * K}"],
            )
            fp32 = {}  # the fp32 medians of this row, for the bf16 speed-ups
            for precision in args.precision:
                modes = [m for m in ("non-private", *args.modes) if m == "non-private" or m in MODES]
                modes = list(dict.fromkeys(modes))
                if precision != "fp32":
                    modes = [m for m in modes if m in BF16_MODES]
                if size == "sd15":
                    modes = [m for m in modes if m in ("non-private", "bk")]
                runs = {
                    m: build(
                        r,
                        m,
                        batch,
                        device=device,
                        precision=precision,
                        sd_latent=args.sd_latent if size == "sd15" else 0,
                        sd_scale=args.sd_scale,
                    )
                    for m in modes
                }
                times = {m: [] for m in modes}
                for _ in range(args.warmup):
                    for m in modes:
                        runs[m][1]()
                for _ in range(args.repeats):
                    for m in modes:
                        times[m].append(runs[m][1]())
                med = {m: statistics.median(v) for m, v in times.items()}
                peak = {m: _peak_step_mib(runs[m][1], device) for m in ("non-private", "bk") if m in modes}
                den, _, desc = runs["non-private"]
                base = med["non-private"]

                def ratio(m):
                    return f"{med[m] / base:.2f}×" if m in med else "—"

                def speedup(m):
                    return f"{fp32[m] / med[m]:.2f}×" if m in med and m in fp32 and precision != "fp32" else "—"

                if precision == "fp32":
                    fp32 = med
                bk_rate = _rate(batch / med["bk"]) if "bk" in med else "—"
                cells = [
                    f"{size}: {desc}",
                    f"{count_parameters(den) / 1e6:.2f}M",
                    f"{batch} × {K}",
                    precision,
                    f"{base * 1e3:.1f} ms",
                    _rate(batch / base),
                    ratio("hooks"),
                    ratio("functorch"),
                    f"**{ratio('bk')}**",
                    bk_rate,
                    f"{peak.get('non-private', float('nan')):.0f} / {peak.get('bk', float('nan')):.0f}",
                    f"{speedup('non-private')} / {speedup('bk')}",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)
                del runs, den
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--recipe",
        nargs="+",
        default=["recipes/dpdm-mnist5k.yaml"],
        help="one or more recipes; with several, their steps are interleaved too and compared",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="examples per step (fixed, for timing)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-path memory subprocesses")
    ap.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's allocator as it is (privdiff's CLI keeps freed memory: privdiff.runtime)",
    )
    ap.add_argument(
        "--sizes",
        nargs="+",
        choices=list(SIZES),
        help="issue 21's table for these model sizes instead of --recipe (on a CPU, leave out sd15)",
    )
    ap.add_argument("--rows", nargs="+", help="with --sizes: rows BxK (e.g. 256x1) instead of each size's own")
    ap.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "bf16"],
        help="with --sizes: the precisions of each row (default: fp32 bf16 on a GPU, fp32 on a CPU)",
    )
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps of each path before the timed ones")
    ap.add_argument("--sd-latent", type=int, default=32, help="sd15: latent side (32: 256-px images; 64: 512 px)")
    ap.add_argument("--sd-scale", type=int, default=1, help="sd15: divide its widths by this (1: the real config)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.system_malloc:
        os.environ["PRIVDIFF_MALLOC"] = "system"  # children inherit it
    kept = keep_freed_memory()  # as `privdiff train` does, for every path alike
    if _device().type == "cpu":
        torch.set_num_threads(args.threads)
    if args.sizes:
        args.precision = args.precision or (["fp32", "bf16"] if _device().type == "cuda" else ["fp32"])
        return table(args)
    # "recipe.yaml@key=value,key=value": a recipe with its own overrides (after the common ones)
    recipes = {
        spec: resolve_recipe(
            spec.split("@")[0], [*args.overrides, *(spec.split("@")[1].split(",") if "@" in spec else [])]
        )
        for spec in args.recipe
    }
    if args.child:
        return child(args, next(iter(recipes.values())))
    modes = ["non-private"] + [m for m in args.modes if m != "non-private"]
    for batch in args.batch:
        runs = {(p, m): build(r, m, batch, device=_device()) for p, r in recipes.items() for m in modes}
        times = {key: [] for key in runs}
        for _ in range(args.warmup):
            for key in runs:
                runs[key][1]()
        for _ in range(args.repeats):
            for key in runs:
                times[key].append(runs[key][1]())
        medians = {key: statistics.median(v) for key, v in times.items()}
        for path, r in recipes.items():
            memory = {}
            if not args.no_memory:
                for m in modes:
                    path_, _, own = path.partition("@")
                    out = subprocess.run(
                        [
                            sys.executable,
                            "-W",
                            "ignore",
                            __file__,
                            "--recipe",
                            path_,
                            "--batch",
                            str(batch),
                            "--threads",
                            str(args.threads),
                            "--child",
                            m,
                            *args.overrides,
                            *(own.split(",") if own else []),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    memory[m] = json.loads(out.stdout.strip().splitlines()[-1])
            base = medians[(path, "non-private")]
            den, _, desc = runs[(path, "non-private")]
            P = count_parameters(den)
            print(
                f"\n{path}: {desc}, {P:,} trainable params, batch {batch} x K={r.privacy.noise_multiplicity}, "
                f"{args.threads} threads, median of {args.repeats}, allocator: {'freed memory kept' if kept else 'system'}"
            )
            print(
                f"{'path':<12} {'s/step':>8} {'ratio vs non-private':>21} {'step peak MiB':>14} {'per-example grads MiB':>22}"
            )
            for m in modes:
                med = medians[(path, m)]
                mem = memory.get(m, {})
                print(
                    f"{m:<12} {med:>8.3f} {med / base:>21.2f} {mem.get('step_mib', float('nan')):>14.0f} {mem.get('per_example_mib', float('nan')):>22.1f}"
                )
        if len(recipes) > 1:
            first, mode = args.recipe[0], modes[-1]
            print(f"\n{mode} step of each recipe over {first}'s (same batch, interleaved):")
            for path in args.recipe[1:]:
                print(
                    f"  {path}: {medians[(path, mode)] / medians[(first, mode)]:.2f}x  ({medians[(path, mode)]:.3f} s vs {medians[(first, mode)]:.3f} s)"
                )


if __name__ == "__main__":
    main()
