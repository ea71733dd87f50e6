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


def _model_and_batch(r, batch: int, g: torch.Generator):
    """The recipe's network (fresh weights; DP-LDM: only ``ldm.trainable`` trainable), a fixed batch and its conditions."""
    res = r.data.resolution or 28
    if r.method != "dp-ldm":
        net = build_unet(r.model, resolution=res, in_channels=1, num_classes=10)
        x0 = torch.rand(batch, 1, res, res, generator=g) * 2 - 1
        y = torch.randint(0, 10, (batch,), generator=g)
        return net, x0, lambda i, K, gen: y[i][:, None].expand(-1, K), f"UNet {list(r.model.channels)} @ {res}px"
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
        images=x0,
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
    return net, x0, caption_conditioner(data, r, tok, torch.device("cpu")), desc


def build(r, mode: str, batch: int):
    """A fresh model and engine for ``mode``, the step function on a fixed random batch, and the model's description."""
    K = r.privacy.noise_multiplicity
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net, x0, condition, desc = _model_and_batch(r, batch, g)
    sigma_dist = make_sigma_distribution("lognormal")
    idx = torch.arange(batch)
    den = make_denoiser(r, net)
    opt = torch.optim.Adam([p for p in den.parameters() if p.requires_grad], lr=r.train.lr)
    common = dict(
        num_examples=10 * batch,
        batch_size=batch,
        noise_multiplicity=K,
        max_physical_batch_size=r.train.max_physical_batch_size,
        generator=torch.Generator().manual_seed(1),
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
            noise_generator=torch.Generator().manual_seed(2),
            **common,
        )

    def loss_fn(module, i):
        s, n = draw_training_noise(x0[i], K=K, sigma_dist=sigma_dist, generator=g)
        return denoising_loss(module, x0[i], condition(i, K, g), sigma=s, noise=n, loss_weight=den.loss_weight)

    def step() -> float:
        t = time.perf_counter()
        eng.step(idx, loss_fn)
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
    _, step, _ = build(r, args.child, args.batch[0])
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) of this process
        f.write("5")
    before = _status_mib("VmRSS")
    for _ in range(3):
        held.clear()
        step()
    per_example = max(state[0], sum(held))
    print(json.dumps({"step_mib": _status_mib("VmHWM") - before, "per_example_mib": per_example / 2**20}))


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
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.system_malloc:
        os.environ["PRIVDIFF_MALLOC"] = "system"  # children inherit it
    kept = keep_freed_memory()  # as `privdiff train` does, for every path alike
    torch.set_num_threads(args.threads)
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
        runs = {(p, m): build(r, m, batch) for p, r in recipes.items() for m in modes}
        times = {key: [] for key in runs}
        for key in runs:  # warm-up
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
