"""Per denoising step: latency and bytes of plaintext, HE-Diffusion's four variants (compat mode) and
private mode. Prints a markdown table (docs/benchmarks.md records it with this command).

    PYTHONPATH=src python benchmarks/he_step.py [--run RUN] [--element-slice 256]
    PYTHONPATH=src python benchmarks/he_step.py --compat-params precise --compat-only   # privdiff's default parameters

Compat variants (the update x_{t-1} = f·x_t + a of one step; the denoiser runs in plaintext on the
server in all of them, as published), on the default model's latent (4×7×7) and on an SD-sized one
(4×64×64), with HE-Diffusion's own CKKS parameters (preset "reference": N=8192, [31,26×6,31], 2^26):

- plain: the update in numpy;
- per-element: one ciphertext per latent element (``ts.ckks_tensor`` with batch=False, the
  "Non-Optimized Encryption" baseline), timed on a slice and extrapolated linearly;
- packed: all elements SIMD-packed into ⌈n/4096⌉ ``ckks_vector``s;
- packed+sparse: the compat loop: HILL selection (τ = 0.01), COO, encrypt the kept ≈89%, update, decrypt, merge.

Private mode: one encrypted denoiser evaluation (with guidance: 2 rows) of the default model
(recipe he-ldm-mnist5k; the served run with --run) through the in-process server, preset "precise";
one sampling step of Heun is two evaluations (the last step one).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


CPU: list[float] = []  # CPU seconds (this process) of the last timed() call, per repeat


def timed(fn, repeat: int = 3):
    """Median wall seconds of ``fn()`` over ``repeat`` calls (its CPU seconds go to ``CPU``) and the last result.
    Both are printed: on a shared machine the CPU time is the better guide to a quiet machine's wall time."""
    out, ts, cs = None, [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    CPU[:] = [statistics.median(cs)]
    return statistics.median(ts), out


def compat_rows(shape, *, element_slice: int, params: str = "reference"):
    import tenseal as ts

    from privdiff.he.ckks import PRESETS, TenSEALContext
    from privdiff.he.compat import coo_pack, encrypt_packed, merge, select_encrypted, update_encrypted

    ctx = TenSEALContext.generate(PRESETS[params])
    g = torch.Generator().manual_seed(0)
    x, D = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    f, a = 0.9, 0.1
    n = x.numel()
    xf, add = x.double().reshape(-1).numpy(), (a * D).double().reshape(-1).numpy()
    rows = []
    t_plain, ref = timed(lambda: f * xf + add, repeat=20)
    rows.append(("plain", t_plain, CPU[0], 0, 0, 0.0))

    # per-element: one ciphertext per value (slice, extrapolated)
    k = min(element_slice, n)

    def per_element():
        t0 = time.perf_counter()
        enc = ts.ckks_tensor(ctx._ctx, ts.plain_tensor(xf[:k].tolist()), batch=False)
        t1 = time.perf_counter()
        out = enc * f + ts.plain_tensor(add[:k].tolist())
        t2 = time.perf_counter()
        dec = np.array(out.decrypt().tolist())
        t3 = time.perf_counter()
        return (t1 - t0, t2 - t1, t3 - t2), len(enc.serialize()), len(out.serialize()), np.abs(dec - ref[:k]).max()

    t_el, (split, up, down, err) = timed(per_element, repeat=1)
    rows.append((f"per-element (×{n / k:.0f} from {k})", t_el * n / k, CPU[0] * n / k, up * n / k, down * n / k, err))

    def packed():
        t0 = time.perf_counter()
        cts = encrypt_packed(ctx, xf)
        out = update_encrypted(ctx, cts, f, add)
        dec = np.concatenate([ctx.decrypt(c) for c in out])
        return (
            sum(len(c.serialize()) for c in cts),
            sum(len(c.serialize()) for c in out),
            np.abs(dec - ref).max(),
            time.perf_counter() - t0,
        )

    t_pk, (up, down, err, _) = timed(packed)
    rows.append(("packed", t_pk, CPU[0], up, down, err))

    def sparse():
        keep = select_encrypted(x)
        idx, values, rem = coo_pack(x, keep)
        cts = encrypt_packed(ctx, values)
        out = update_encrypted(ctx, cts, f, add[idx])
        x_next = merge(f * rem + add, idx, np.concatenate([ctx.decrypt(c) for c in out]))
        plain_parts = idx.size * 8 + rem.size * 8 + xf.size * 4  # indices, remainder, and x_t for the U-Net (plaintext)
        return (
            sum(len(c.serialize()) for c in cts) + plain_parts,
            sum(len(c.serialize()) for c in out) + rem.size * 8,
            np.abs(x_next - ref).max(),
            keep.float().mean().item(),
        )

    t_sp, (up, down, err, frac) = timed(sparse)
    rows.append((f"packed+sparse ({frac:.1%} encrypted)", t_sp, CPU[0], up, down, err))
    return rows


def private_row(run: str | None):
    from privdiff.diffusion import Denoiser
    from privdiff.he.ckks import TenSEALContext
    from privdiff.he.private import PrivateServer, client_net

    if run:
        from privdiff.runs import Run

        net = Run(run).load_net(ema=True).eval()
    else:
        from privdiff.cli import _recipe_path
        from privdiff.config import resolve_recipe
        from privdiff.models.he_net import build_he_net
        from privdiff.models.text import build_text_encoder

        r = resolve_recipe(_recipe_path("he-ldm-mnist5k"))
        te = build_text_encoder(r.ldm.text, class_names=(tuple(str(d) for d in range(10)),))
        net = build_he_net(r.ldm.he, te, latent_channels=4, latent_size=7, num_classes=10).eval()
    server = PrivateServer(net.unet)
    ctx = TenSEALContext.generate()
    sid = server.open_session(ctx.public_bytes())
    remote = client_net(server.spec(), net, ctx, lambda names, P, cts: server.linear(sid, names, P, cts))
    den, den_he = Denoiser(net, sigma_data=1.0), Denoiser(remote, sigma_data=1.0)
    cond = torch.cat([net.conditions(prompts=["a handwritten digit three"], n=1), net.null_condition()[None]])
    x = torch.randn(2, *net.sample_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 1.0)
    with torch.no_grad():
        t_plain, ref = timed(lambda: den(x, sigma, cond), repeat=10)
        c_plain = CPU[0]
        den_he(x, sigma, cond)  # the prompt's keys and values: once per session
        core = remote.unet
        r0, u0, d0 = core.rounds, core.bytes_up, core.bytes_down
        t_he, out = timed(lambda: den_he(x, sigma, cond), repeat=3)
        c_he = CPU[0]
        rounds, up, down = (core.rounds - r0) / 3, (core.bytes_up - u0) / 3, (core.bytes_down - d0) / 3
    err = ((out - ref).norm() / ref.norm()).item()
    params = sum(p.numel() for p in net.unet.parameters())
    return [
        ("plain denoiser evaluation (2 rows)", t_plain, c_plain, 0, 0, 0.0),
        (f"private mode, one evaluation ({rounds:.0f} round trips, {params:,} weights)", t_he, c_he, up, down, err),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="an he-ldm run (default: the recipe's sizes, fresh weights)")
    p.add_argument("--element-slice", type=int, default=256)
    p.add_argument("--skip-large", action="store_true")
    p.add_argument(
        "--compat-params", choices=["reference", "precise"], default="reference", help="CKKS preset of the compat rows"
    )
    p.add_argument("--compat-only", action="store_true", help="skip the private-mode row")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the CLI: the torch work is tiny, a thread pool only contends with TenSEAL
    print("| latent | variant | wall s / step | CPU s / step | MB up | MB down | max abs err |")
    print("|---|---|---|---|---|---|---|")
    for shape in [(1, 4, 7, 7)] + ([] if args.skip_large else [(1, 4, 64, 64)]):
        for name, t, c, up, down, err in compat_rows(
            shape, element_slice=args.element_slice, params=args.compat_params
        ):
            print(
                f"| {'×'.join(map(str, shape[1:]))} | compat: {name} | {t:.4g} | {c:.4g} | {up / 1e6:.3g} | {down / 1e6:.3g} | {err:.2g} |",
                flush=True,
            )
    for name, t, c, up, down, err in [] if args.compat_only else private_row(args.run):
        print(
            f"| 4×7×7 | {name} | {t:.4g} | {c:.4g} | {up / 1e6:.3g} | {down / 1e6:.3g} | {err:.2g} (rel) |", flush=True
        )


if __name__ == "__main__":
    main()
