"""Time of one DP-SGD step over one non-private step, same UNet and batch, per grad-sample mode.

Both steps run side by side in one process (interleaved repeats, median), so the ratio is robust
to a shared machine's drift. Example (the figures in docs/benchmarks.md):

    .venv/bin/python benchmarks/dp_step_overhead.py --recipe recipes/dpdm-mnist5k.yaml --batch 128 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from privdiff.config import resolve_recipe
from privdiff.diffusion import denoising_loss, draw_training_noise, make_sigma_distribution
from privdiff.methods.stages import make_denoiser
from privdiff.models import build_unet, count_parameters
from privdiff.privacy.dpsgd import DPSGD, NonPrivateSGD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/dpdm-mnist5k.yaml")
    ap.add_argument("--batch", type=int, default=128, help="examples per step (fixed, for timing)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = resolve_recipe(args.recipe, args.overrides)
    res = r.data.resolution or 28
    K = r.privacy.noise_multiplicity
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(args.batch, 1, res, res, generator=g) * 2 - 1
    y = torch.randint(0, 10, (args.batch,), generator=g)
    sigma_dist = make_sigma_distribution("lognormal")
    idx = torch.arange(args.batch)

    def make(mode: str | None):
        torch.manual_seed(0)
        den = make_denoiser(r, build_unet(r.model, resolution=res, in_channels=1, num_classes=10))
        opt = torch.optim.Adam(den.parameters(), lr=r.train.lr)
        common = dict(num_examples=10 * args.batch, batch_size=args.batch, noise_multiplicity=K,
                      max_physical_batch_size=r.train.max_physical_batch_size, generator=torch.Generator().manual_seed(1))
        if mode is None:
            return den, NonPrivateSGD(den, opt, **common)
        return den, DPSGD(den, opt, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
                          noise_generator=torch.Generator().manual_seed(2), **common)

    engines = {"non-private": make(None), "dp hooks": make("hooks"), "dp functorch": make("functorch")}

    def one_step(den, eng) -> float:
        def loss_fn(module, i):
            s, n = draw_training_noise(x0[i], K=K, sigma_dist=sigma_dist, generator=g)
            return denoising_loss(module, x0[i], y[i][:, None].expand(-1, K), sigma=s, noise=n, loss_weight=den.loss_weight)

        t = time.perf_counter()
        eng.step(idx, loss_fn)
        return time.perf_counter() - t

    times = {k: [] for k in engines}
    for name, (den, eng) in engines.items():  # warm-up
        one_step(den, eng)
    for _ in range(args.repeats):
        for name, (den, eng) in engines.items():
            times[name].append(one_step(den, eng))
    base = statistics.median(times["non-private"])
    P = count_parameters(engines["non-private"][0])
    print(f"UNet {list(r.model.channels)} @ {res}px, {P:,} params, batch {args.batch} x K={K}, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'mode':<14} {'s/step':>8} {'ratio vs non-private':>22}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<14} {m:>8.3f} {m / base:>22.2f}")


if __name__ == "__main__":
    main()
