"""Private mode at Stable-Diffusion scale, measured: one encrypted 3×3 convolution of SD 1.5's first block.

privdiff's private mode evaluates every weighted layer on CKKS ciphertexts (one round trip per layer; the client
decrypts, applies the weight-free operations and encrypts the next input: docs/he.md). Its denoiser is
Linear-only. A convolutional UNet (SD 1.5: 98 Conv2d layers, 52 of them 3×3) would need each convolution as an
encrypted layer. This script measures one, ``down_blocks.0.resnets.0.conv1`` (320 → 320 channels, 3×3, on the
64×64 latent of a 512-px image), on a slice of its channels at the full 64×64 (``--channels``), checks it
against ``torch.nn.functional.conv2d``, and scales the per-operation costs it measured by the exact operation
counts of the full layer and of every convolution of the SD 1.5 UNet (built from its config on the meta
device: no weights, no download).

Packing (rotation-free, as privdiff's private mode): positions in the slots. The client, which holds the
activation in plaintext, sends one ciphertext per (input channel, kernel offset): the channel's map shifted
by the offset, zero-padded (im2col over channels × 9 offsets; P = H·W positions, 4096 = all the slots of
N = 8192 at 64×64). The server computes each output channel as Σ_{i,k} ct_{i,k} · W[o, i, k] (+ b[o]):
ct × scalar products and additions only, no rotation, no Galois keys. Where P < slots (lower UNet levels),
G = slots/P input units share a ciphertext and the weights are vectors; the client sums the G partial copies
after decrypting (the G-copy trick of ``privdiff.he.private``). Counts per layer, B = ⌈P/slots⌉ blocks:
up B·⌈9·c_in/G⌉ ciphertexts, down B·c_out, products B·c_out·⌈9·c_in/G⌉.

Two server variants are timed: ``rescale`` (each product rescaled, as ``PrivateServer`` computes today) and
``lazy`` (no rescale: the sum stays at scale Δ², which the client decrypts; 7× fewer NTTs). For comparison the
counts of privdiff's own linear-layer packing (``privdiff.he.private.layout``, which replicates every input
over the n_out outputs in the slots) and of a Gazelle-style packing with server-side rotations (one channel per
ciphertext, 8 rotations per input channel; the rotation's time estimated from TenSEAL's ``CKKSVector.sum()``,
log2(slots) rotations) are given for the same layer.

    .venv/bin/python -W ignore benchmarks/he_sd_conv.py --channels 16
    .venv/bin/python -W ignore benchmarks/he_sd_conv.py --channels 8 --side 32 --params reference

The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from privdiff.he.ckks import PRESETS, Ciphertext, TenSEALContext
from privdiff.he.private import layout
from sd15 import SD15_UNET

LAYER = "down_blocks.0.resnets.0.conv1"


def sd15_convs(latent: int = 64) -> list[dict]:
    """Every Conv2d of the SD 1.5 UNet in forward order, with its input/output sizes on a ``latent``² latent."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    convs: list[dict] = []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(
                lambda mod, inp, out, name=name: convs.append(
                    {
                        "name": name,
                        "c_out": mod.out_channels,
                        "c_in": mod.in_channels,
                        "k": mod.kernel_size[0],
                        "stride": mod.stride[0],
                        "out_hw": int(out.shape[-2] * out.shape[-1]),
                    }
                )
            )
    with torch.no_grad():
        meta = torch.device("meta")
        unet(
            torch.zeros(1, 4, latent, latent, device=meta),
            torch.tensor([10], device=meta),
            encoder_hidden_states=torch.zeros(1, 77, 768, device=meta),
        )
    return convs


def counts(*, c_in: int, c_out: int, k: int, positions: int, slots: int) -> dict:
    """Ciphertexts up and down and ct × pt products of one conv layer in the positions-in-slots packing."""
    B = math.ceil(positions / slots)
    G = 1 if positions >= slots else slots // positions
    up = B * math.ceil(k * k * c_in / G)
    return {"blocks": B, "G": G, "up": up, "down": B * c_out, "products": B * c_out * math.ceil(k * k * c_in / G)}


def shifted_inputs(x: np.ndarray, k: int) -> np.ndarray:
    """im2col over channels: [c_in·k², H·W], row (i, dy, dx) = channel i shifted by the offset, zero-padded."""
    c, H, W = x.shape
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p)))
    return np.stack(
        [xp[i, dy : dy + H, dx : dx + W].reshape(-1) for i in range(c) for dy in range(k) for dx in range(k)]
    )


def run(channels: int, side: int, params: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    k, c = 3, channels
    P = side * side
    client = TenSEALContext.generate(PRESETS[params])
    slots = client.params.slots
    public = client.public_bytes()
    server = TenSEALContext.from_public_bytes(public, allowed=(client.params,))
    # an activation after GroupNorm + SiLU is O(1); weights at the default Conv2d init scale 1/√(9·c_in) of the full layer
    x = rng.standard_normal((c, side, side))
    Wt = rng.uniform(-1, 1, (c, c, k, k)) / math.sqrt(9 * 320)
    b = rng.uniform(-1, 1, c) / math.sqrt(9 * 320)
    ref = F.conv2d(torch.from_numpy(x)[None], torch.from_numpy(Wt), torch.from_numpy(b), padding=1)[0].numpy()
    n = counts(c_in=c, c_out=c, k=k, positions=P, slots=slots)
    B, G = n["blocks"], n["G"]
    U = shifted_inputs(x, k)  # [9c, P]
    Wm = Wt.reshape(c, -1)  # [c_out, 9c], column (i, dy, dx)
    per = min(P, slots)  # positions per block
    groups = math.ceil(U.shape[0] / G)

    # client: pack and encrypt (block b, group j: copies g = units jG + g at the block's positions)
    def vec(rows: np.ndarray, j: int, b_: int) -> np.ndarray:
        out = np.zeros((G, per))
        for g in range(G):
            u = j * G + g
            if u < rows.shape[0]:
                out[g] = rows[u, b_ * per : (b_ + 1) * per]
        return out.reshape(-1)

    t = time.perf_counter()
    up = [[client.encrypt(vec(U, j, b_)).serialize() for j in range(groups)] for b_ in range(B)]
    t_encrypt = time.perf_counter() - t
    bytes_up = sum(len(u) for row in up for u in row)

    results = {}
    for variant in ("rescale", "lazy"):
        server._ctx.auto_rescale = variant == "rescale"
        t = time.perf_counter()
        cts = [[server.ciphertext_from_bytes(u, fresh=True) for u in row] for row in up]
        t_load = time.perf_counter() - t
        t, t_bias = time.perf_counter(), 0.0
        down = []
        for b_ in range(B):
            for o in range(c):
                acc = None
                for j, ct in enumerate(cts[b_]):
                    if G == 1:  # ct × scalar W[o, unit j]
                        term = Ciphertext(ct.data * float(Wm[o, j]))
                    else:  # ct ⊙ (W[o, jG + g] in copy g)
                        w = np.zeros((G, per))
                        for g in range(G):
                            if j * G + g < Wm.shape[1]:
                                w[g] = Wm[o, j * G + g]
                        term = server.mul_plain(ct, w.reshape(-1))
                    acc = term if acc is None else server.add(acc, term)
                bias = np.zeros((G, per))
                bias[0] = b[o]
                tb = time.perf_counter()
                if variant == "rescale":
                    acc = server.add_plain(acc, bias.reshape(-1))
                else:  # the sum is at scale Δ²: the bias, encrypted under the public key, × 1 to the same scale
                    acc = server.add(acc, Ciphertext(server.encrypt(bias.reshape(-1)).data * 1.0))
                t_bias += time.perf_counter() - tb
                down.append(acc.serialize())
        t_compute = time.perf_counter() - t - t_bias
        # a ct ⊙ (plaintext vector) product + add, for packings whose weights are vectors (G > 1, rotations)
        ct, w = cts[0][0], rng.standard_normal(slots if G == 1 else G * per)
        acc = server.mul_plain(ct, w[: ct.size])
        tv = time.perf_counter()
        for _ in range(20):
            acc = server.add(acc, server.mul_plain(ct, w[: ct.size]))
        per_vector = (time.perf_counter() - tv) / 20
        bytes_down = sum(map(len, down))
        # client: decrypt, sum the G copies
        t = time.perf_counter()
        Y = np.zeros((c, P))
        for idx, blob in enumerate(down):
            b_, o = divmod(idx, c)
            v = client.decrypt(client.ciphertext_from_bytes(blob))
            Y[o, b_ * per : (b_ + 1) * per] = v[: G * per].reshape(G, per).sum(0)
        t_decrypt = time.perf_counter() - t
        err = float(np.abs(Y.reshape(ref.shape) - ref).max())
        results[variant] = {
            "load_s": t_load,
            "compute_s": t_compute,
            "decrypt_s": t_decrypt,
            "bytes_down": bytes_down,
            "max_abs_err": err,
            "per_product_s": t_compute / n["products"],
            "per_vector_product_s": per_vector,
            "per_bias_s": t_bias / n["down"],
            "per_down_bytes": bytes_down / n["down"],
            "per_decrypt_s": t_decrypt / n["down"],
        }
    server._ctx.auto_rescale = True
    # a rotation's time, for the Gazelle-style alternative: CKKSVector.sum() is log2(slots) rotations (+ adds)
    import tenseal as ts

    g_ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=client.params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(client.params.coeff_mod_bit_sizes),
    )
    g_ctx.global_scale = 2.0**client.params.scale_bits
    g_ctx.generate_galois_keys()
    galois_bytes = len(
        g_ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=True, save_relin_keys=False)
    )
    e = ts.ckks_vector(g_ctx, rng.standard_normal(slots).tolist())
    t = time.perf_counter()
    for _ in range(5):
        e.sum()
    per_rotation = (time.perf_counter() - t) / 5 / math.log2(slots)
    return {
        "params": params,
        "slots": slots,
        "channels": c,
        "side": side,
        "counts": n,
        "encrypt_s": t_encrypt,
        "per_encrypt_s": t_encrypt / n["up"],
        "bytes_up": bytes_up,
        "per_up_bytes": bytes_up / n["up"],
        "public_context_bytes": len(public),
        "galois_keys_bytes": galois_bytes,
        "per_rotation_s": per_rotation,
        "variants": results,
        "load_average": os.getloadavg(),
    }


def project(m: dict, conv: dict, *, rows: int = 1) -> dict:
    """Time (client encrypt + server load and products + client decrypt, one core) and bytes of one conv layer
    over ``rows`` images (2: classifier-free guidance), from the per-operation costs measured in ``m``."""
    n = counts(c_in=conv["c_in"], c_out=conv["c_out"], k=conv["k"], positions=rows * conv["out_hw"], slots=m["slots"])
    out = {"counts": n}
    for variant, v in m["variants"].items():
        load = v["load_s"] / m["counts"]["up"]
        out[variant] = {
            "client_s": n["up"] * m["per_encrypt_s"] + n["down"] * v["per_decrypt_s"],
            "server_s": n["up"] * load
            + n["products"] * (v["per_product_s"] if n["G"] == 1 else v["per_vector_product_s"])
            + n["down"] * v["per_bias_s"],
            "bytes_up": n["up"] * m["per_up_bytes"],
            "bytes_down": n["down"] * v["per_down_bytes"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=16, help="input = output channels of the measured slice (of 320)")
    ap.add_argument("--side", type=int, default=64, help="spatial side of the measured slice (SD 1.5 at 512 px: 64)")
    ap.add_argument("--params", choices=sorted(PRESETS), default="precise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=50, help="PLMS steps of the projected image")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    m = run(args.channels, args.side, args.params, args.seed)
    convs = sd15_convs(64)
    layer = next(cv for cv in convs if cv["name"] == LAYER)
    full = project(m, layer)
    unet = {"rows1": None, "rows2": None}
    for rows in (1, 2):
        tot = {"layers": len(convs), "up": 0, "down": 0, "products": 0}
        per = {v: {"client_s": 0.0, "server_s": 0.0, "bytes_up": 0.0, "bytes_down": 0.0} for v in m["variants"]}
        for cv in convs:
            p = project(m, cv, rows=rows)
            for key in ("up", "down", "products"):
                tot[key] += p["counts"][key]
            for v in per:
                for key in per[v]:
                    per[v][key] += p[v][key]
        unet[f"rows{rows}"] = {"counts": tot, **per}
    # privdiff's linear-layer packing (private.layout) on the same full layer, and a rotation-based alternative
    blocks = layout(layer["out_hw"], 9 * layer["c_in"], layer["c_out"], m["slots"])
    linear_up = sum(blk.K for blk in blocks)
    gazelle = {
        "up": layer["c_in"],
        "rotations": 8 * layer["c_in"],
        "products": 9 * layer["c_in"] * layer["c_out"],
        "down": layer["c_out"],
    }
    report = {
        "measured": m,
        "layer": layer,
        "full_layer": full,
        "unet_convs": unet,
        "private_layout_full_layer": {"up": linear_up, "products": linear_up, "down": len(blocks)},
        "rotations_full_layer": gazelle,
    }

    v = m["variants"]
    print(
        f"measured: {LAYER} slice {args.channels}→{args.channels} ch, {args.side}×{args.side}, CKKS {args.params} "
        f"(N = {2 * m['slots']}), load average {m['load_average'][0]:.1f}"
    )
    print(
        f"  packing: {m['counts']['up']} ciphertexts up ({m['per_up_bytes'] / 1e3:.0f} kB each), "
        f"{m['counts']['down']} down, {m['counts']['products']} ct×pt products, 0 rotations, G = {m['counts']['G']}"
    )
    print(f"  client encrypt {m['encrypt_s']:.2f} s ({m['per_encrypt_s'] * 1e3:.1f} ms per ciphertext)")
    for name, r in v.items():
        print(
            f"  server [{name}]: load {r['load_s']:.2f} s, products {r['compute_s']:.2f} s "
            f"({r['per_product_s'] * 1e3:.3f} ms per product+add); client decrypt {r['decrypt_s']:.2f} s; "
            f"down {r['bytes_down'] / 1e6:.1f} MB; max |err| vs conv2d {r['max_abs_err']:.1e}"
        )
    print(
        f"  a rotation (from CKKSVector.sum): {m['per_rotation_s'] * 1e3:.2f} ms; Galois keys {m['galois_keys_bytes'] / 1e6:.1f} MB; "
        f"a vector product+add {v['rescale']['per_vector_product_s'] * 1e3:.2f} ms (rescaled), "
        f"{v['lazy']['per_vector_product_s'] * 1e3:.2f} ms (lazy)"
    )
    print()
    print("| scope | packing | ct up | ct down | products | rotations | server s | client s | GB up | GB down |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def row(scope, packing, c, r, rotations=0):
        print(
            f"| {scope} | {packing} | {c['up']:,} | {c['down']:,} | {c['products']:,} | {rotations:,} | "
            f"{r['server_s']:,.0f} | {r['client_s']:,.0f} | {r['bytes_up'] / 1e9:,.2f} | {r['bytes_down'] / 1e9:,.2f} |"
        )

    for name in v:
        row(f"{LAYER} (320→320, 64×64)", f"positions in slots, {name}", full["counts"], full[name])
    for name in v:
        u = unet["rows2"]
        row(
            f"all {u['counts']['layers']} convs, one evaluation with guidance (2 rows)",
            f"positions in slots, {name}",
            u["counts"],
            u[name],
        )
    evals = args.steps + 1  # PLMS: one evaluation per step, two for the first
    for name in v:
        u = unet["rows2"]
        row(
            f"all convs, one 512-px image ({args.steps} PLMS steps = {evals} evaluations, guidance)",
            f"positions in slots, {name}",
            {k: evals * x for k, x in u["counts"].items() if k != "layers"},
            {k: evals * x for k, x in u[name].items()},
        )
    lz = v["lazy"]
    g_server = gazelle["rotations"] * m["per_rotation_s"] + gazelle["products"] * v["rescale"]["per_vector_product_s"]
    print(
        f"| {LAYER} | rotations on the server (Gazelle-style, one channel per ciphertext) | {gazelle['up']:,} | "
        f"{gazelle['down']:,} | {gazelle['products']:,} | {gazelle['rotations']:,} | ≈{g_server:,.0f} | "
        f"{gazelle['up'] * m['per_encrypt_s'] + gazelle['down'] * lz['per_decrypt_s']:,.0f} | "
        f"{gazelle['up'] * m['per_up_bytes'] / 1e9:.2f} + {m['galois_keys_bytes'] / 1e9:.3f} keys | "
        f"{gazelle['down'] * v['rescale']['per_down_bytes'] / 1e9:.2f} |"
    )
    pl = report["private_layout_full_layer"]
    print(
        f"| {LAYER} | privdiff.he.private.layout (inputs replicated over outputs) | {pl['up']:,} | {pl['down']:,} | "
        f"{pl['products']:,} | 0 | {pl['products'] * v['rescale']['per_vector_product_s']:,.0f} | "
        f"{pl['up'] * m['per_encrypt_s']:,.0f} | {pl['up'] * m['per_up_bytes'] / 1e9:,.0f} | "
        f"{pl['down'] * v['rescale']['per_down_bytes'] / 1e9:.2f} |"
    )
    # where one evaluation's time goes: by output resolution and kernel (2 rows, as above)
    levels: dict = {}
    for cv in convs:
        side, p = int(math.isqrt(cv["out_hw"])), project(m, cv, rows=2)
        a = levels.setdefault(
            (side, cv["k"]),
            {"layers": 0, "G": p["counts"]["G"], "up": 0, "products": 0, "lazy": 0.0, "rescale": 0.0, "gb": 0.0},
        )
        a["layers"] += 1
        a["up"] += p["counts"]["up"]
        a["products"] += p["counts"]["products"]
        a["lazy"] += p["lazy"]["server_s"]
        a["rescale"] += p["rescale"]["server_s"]
        a["gb"] += p["lazy"]["bytes_up"] / 1e9
    report["levels"] = {f"{side}x{side} {k}x{k}": a for (side, k), a in levels.items()}
    print()
    print("| output side | kernel | layers | G | ct up | products | server s, lazy | server s, rescale | GB up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (side, k), a in sorted(levels.items(), key=lambda kv: (-kv[0][0], -kv[0][1])):
        print(
            f"| {side}×{side} | {k}×{k} | {a['layers']} | {a['G']} | {a['up']:,} | {a['products']:,} | "
            f"{a['lazy']:,.0f} | {a['rescale']:,.0f} | {a['gb']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
