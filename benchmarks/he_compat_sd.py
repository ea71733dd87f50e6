"""HE-Diffusion (compat mode) on a Stable-Diffusion-1.5-sized pipeline: time per PLMS step split into the server's
plaintext UNet and the CKKS work, bytes per step, peak memory, and the error against plaintext PLMS.

The pipeline is built in memory from the SD 1.5 configs with random weights (nothing is downloaded or written):
the UNet (``UNet2DConditionModel``, 859.5M parameters; ``--scale`` divides its widths), a text encoder of CLIP
ViT-L/14's text shape (768 wide, 12 layers, 77 tokens) over a character vocabulary, SD's VAE, and SD 1.5's PNDM
scheduler config. The protocol runs in one process without HTTP (the same calls and the same bytes as
``privdiff he serve --pipeline`` / ``he generate --mode compat``): per step the client selects, packs and
encrypts, the server (:class:`privdiff.he.compat.PipelineCompatServer`) runs the guided UNet on the plaintext
x_t and updates the ciphertexts, the client decrypts and merges; the last latent is decoded with the VAE.

    .venv/bin/python -W ignore benchmarks/he_compat_sd.py --steps 3 --check          # CPU: a few steps
    .venv/bin/python -W ignore benchmarks/he_compat_sd.py --steps 50 --device cuda   # one 512-px image on a GPU

The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from privdiff.diffusion.discrete import DiscreteSchedule
from privdiff.he.ckks import PRESETS, TenSEALContext
from privdiff.he.compat import coo_pack, encrypt_packed, merge, select_encrypted
from privdiff.he.server import pipeline_service
from sd15 import scaled

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build(latent: int, scale: int, tmp: Path):
    """(net, vae) of an SD-1.5-shaped pipeline with random weights (widths divided by ``scale``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from privdiff.models.pretrained import TextUNetNet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**scaled(scale, sample_size=latent))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="quick_gelu",
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=8 * latent,
        scaling_factor=0.18215,
    ).eval()
    net = TextUNetNet(
        unet,
        DiscreteSchedule.from_config(SD15_SCHEDULER),
        text_encoder=text,
        tokenizer=tokenizer,
        base=tmp,
        scheduler_config=SD15_SCHEDULER,
    )
    return net.eval(), vae


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="PLMS steps (SD: 50)")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 512-px images)")
    ap.add_argument("--scale", type=int, default=1, help="divide the UNet's widths (1: SD 1.5's)")
    ap.add_argument("--guidance", type=float, default=6.5, help="w (SD's guidance scale 7.5)")
    ap.add_argument("--params", choices=["precise", "reference"], default="precise")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check", action="store_true", help="also run plaintext PLMS and report the difference (CPU)")
    ap.add_argument("--prompt", default="a red bicycle leaning on a wall")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        net, vae = build(args.latent, args.scale, Path(tmp))
        params = sum(p.numel() for p in net.unet.parameters())
        service = pipeline_service(net, vae, device=args.device)
        compat = service.compat
        print(
            f"built: UNet {params / 1e6:.1f}M parameters, latent 4×{args.latent}×{args.latent}, {time.perf_counter() - t:.1f} s"
        )

        unet_times: list[float] = []
        coefficients = compat.coefficients

        def timed(*a):
            t0 = time.perf_counter()
            out = coefficients(*a)  # the guided UNet (and the PLMS combination); ends in .cpu(): synchronised
            unet_times.append(time.perf_counter() - t0)
            return out

        compat.coefficients = timed
        ctx = TenSEALContext.generate(PRESETS[args.params])
        session = compat.new_session(ctx.public_bytes(), args.prompt, args.guidance, steps=args.steps)
        shape = (1, 4, args.latent, args.latent)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        rows, latents = [], []
        for i in range(args.steps):
            t0 = time.perf_counter()
            # client: select, pack, encrypt
            mask = select_encrypted(x)
            idx, values, rem = coo_pack(x, mask)
            cts = [c.serialize() for c in encrypt_packed(ctx, values)]
            frames = [x.float().numpy().tobytes(), idx.astype(np.int64).tobytes(), rem.tobytes()] + cts
            t1 = time.perf_counter()
            # server: the UNet on the plaintext x_t, the update on the ciphertexts
            out = compat.compute(session, i, frames)
            t2 = time.perf_counter()
            # client: decrypt, merge
            r_new = np.frombuffer(out[0], dtype=np.float64)
            dec = np.concatenate([ctx.decrypt(ctx.ciphertext_from_bytes(c)) for c in out[1:]])
            merged = merge(r_new, idx, dec).reshape(shape)
            t3 = time.perf_counter()
            latents.append(merged)
            x = torch.from_numpy(merged).float()
            unet = unet_times[-1]
            rows.append(
                {
                    "unet_s": unet,
                    "he_s": (t1 - t0) + (t2 - t1 - unet) + (t3 - t2),
                    "up": sum(map(len, frames)),
                    "down": sum(map(len, out)),
                    "encrypted": float(mask.float().mean()),
                }
            )
            print(
                f"step {i}: UNet {unet:.2f} s, CKKS work {rows[-1]['he_s']:.3f} s, "
                f"{rows[-1]['up'] / 1e6:.2f} MB up, {rows[-1]['down'] / 1e6:.2f} MB down",
                flush=True,
            )
        t = time.perf_counter()
        image = ((vae.decode(torch.from_numpy(latents[-1]).float() / vae.config.scaling_factor).sample + 1) / 2).clamp(
            0, 1
        )
        decode_s = time.perf_counter() - t

        err = None
        if args.check and args.device == "cpu":  # plaintext PLMS from the same x_T (drawn on the CPU generator)
            from privdiff.diffusion import guided_denoiser
            from privdiff.diffusion.schedulers import make_scheduler, sample_scheduler

            cond = net.conditions(prompts=[args.prompt], n=1)
            fn = guided_denoiser(compat.denoiser, cond, guidance=args.guidance, null_label=net.null_condition())
            seen: list[np.ndarray] = []
            sample_scheduler(
                fn,
                scheduler=make_scheduler("pndm", SD15_SCHEDULER),
                schedule=net.schedule,
                shape=shape,
                steps=args.steps,
                generator=torch.Generator().manual_seed(0),
                callback=lambda state: seen.append(state["x"].double().numpy()),
            )
            err = max(float(np.abs(a - b).max()) for a, b in zip(latents, seen[1:]))  # callback 0: PNDM's intermediate

    later = rows[1:] or rows
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print()
    print(
        "| UNet | latent | device | CKKS | steps | UNet s / step (first: 2 evals) | CKKS s / step | MB up / step | MB down / step | decode s | peak memory | max \\|HE − plain\\| |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {params / 1e6:.1f}M | 4×{args.latent}×{args.latent} | {args.device} | {args.params} | {args.steps} | "
        f"{np.mean([r['unet_s'] for r in later]):.2f} ({rows[0]['unet_s']:.2f}) | "
        f"{np.mean([r['he_s'] for r in rows]):.3f} | {np.mean([r['up'] for r in rows]) / 1e6:.2f} | "
        f"{np.mean([r['down'] for r in rows]) / 1e6:.2f} | {decode_s:.2f} | "
        f"{'%.1f GiB GPU' % gpu if gpu is not None else '%.1f GiB RSS' % peak_rss} | "
        f"{'—' if err is None else f'{err:.1e}'} |"
    )
    del image


if __name__ == "__main__":
    main()
