"""Compat mode: HE-Diffusion (Chen & Yan, arXiv 2403.05794) as published, for comparison.

Per sampling step (DDIM, i.e. Euler in σ-space, η = 0; reference note §10):

1. client, select: HILL cost (Li et al. 2014) on the channel sum of x_t, distortion d = |x|·cost, and
   the shortest ascending prefix of d whose sum reaches τ·Σd is left in the clear; the rest, the
   keep-mask M (≈ 89% of the elements at τ = 0.01), is encrypted;
2. client, pack: COO indices of M (plaintext), x_t[M] packed into ⌈|M|/slots⌉ CKKS vectors, the
   plaintext remainder r = x_t·¬M; and, as in the published data flow, x_t itself in plaintext for
   the denoiser (the U-Net of the reference runs on the plaintext latent);
3. server: D = D(x_t; σ_t, prompt) in plaintext (with guidance), then the linear update
   x_{t−1} = f·x_t + a with f = σ_{t−1}/σ_t and a = (1 − f)·D: enc ← enc·f + a[M] on ciphertexts
   (one ct × scalar, one ct + pt), r' = f·r + a in plaintext;
4. client: decrypt and merge: x_{t−1} = r', x_{t−1}[M] = dec(enc).

The server sees x_t, D, the prompt, M and r at every step: compat mode hides nothing from it (see
docs/he.md). The encryption only protects what is already in plaintext on the same server.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .ckks import PRESETS, Ciphertext, TenSEALContext
from .protocol import ProtocolError, SessionTable

__all__ = ["hill_cost", "select_encrypted", "coo_pack", "encrypt_packed", "update_encrypted", "merge", "CompatServer",
           "euler_coefficients"]

KB = torch.tensor([[-1.0, 2.0, -1.0], [2.0, -4.0, 2.0], [-1.0, 2.0, -1.0]])  # Ker–Böhme high-pass H


def hill_cost(x: Tensor) -> Tensor:
    """HILL cost L2 ⊛ 1/(L1 ⊛ |H ⊛ X|) of [B, C, H, W] latents, on the channel sum (the reference's
    kernels repeated over channels sum them), reflect padding, 1/0 → 0. Returns [B, 1, H, W]."""
    X = x.double().sum(1, keepdim=True)
    # R = |H ⊛ X|
    R = F.conv2d(F.pad(X, (1, 1, 1, 1), mode="reflect"), KB.double()[None, None]).abs()
    # ξ = 1 / (L1 ⊛ R), L1 = 3×3 mean
    xi = F.avg_pool2d(F.pad(R, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    xi = torch.where(xi > 0, 1.0 / xi, torch.zeros_like(xi))
    # cost = L2 ⊛ ξ, L2 = 15×15 mean (reflect padding needs the side > 7: smaller latents use replicate)
    mode = "reflect" if min(X.shape[-2:]) > 7 else "replicate"
    return F.avg_pool2d(F.pad(xi, (7, 7, 7, 7), mode=mode), 15, stride=1)


def select_encrypted(x: Tensor, *, tau: float = 0.01) -> Tensor:
    """Keep-mask M (True = encrypted): all but the shortest ascending prefix of d = |x|·cost whose sum
    reaches τ·Σd (the reference's ``remove_points``, over the whole tensor)."""
    d = (x.double().abs() * hill_cost(x)).reshape(-1)
    order = torch.argsort(d)
    csum = torch.cumsum(d[order], 0)
    n_removed = int(torch.searchsorted(csum, tau * csum[-1]).item()) + 1  # shortest prefix with Σ ≥ τ·D
    keep = torch.ones_like(d, dtype=torch.bool)
    keep[order[:n_removed]] = False
    return keep.view(x.shape)


def coo_pack(x: Tensor, mask: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO of the encrypted part: flat indices of M, values x[M], and the plaintext remainder x·¬M."""
    flat, m = x.reshape(-1).double().numpy(), mask.reshape(-1).numpy()
    idx = np.flatnonzero(m)
    return idx, flat[idx], np.where(m, 0.0, flat)


def encrypt_packed(ctx: TenSEALContext, values: np.ndarray) -> list[Ciphertext]:
    """values packed into ⌈n/slots⌉ ciphertexts (slot packing: HE-Diffusion's ``ckks_vector`` path)."""
    S = ctx.params.slots
    return [ctx.encrypt(values[i:i + S]) for i in range(0, len(values), S)]


def update_encrypted(ctx: TenSEALContext, cts: list[Ciphertext], factor: float, add: np.ndarray) -> list[Ciphertext]:
    """enc ← enc·f + a, chunk by chunk (one ct × scalar and one ct + pt per ciphertext)."""
    out, off = [], 0
    for ct in cts:
        n = ct.size
        out.append(ctx.add_plain(ctx.mul_plain(ct, np.full(n, factor)), add[off:off + n]))
        off += n
    return out


def merge(remainder: np.ndarray, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    """x_{t−1} = r' with the decrypted values written back at the COO indices."""
    out = remainder.copy()
    out[idx] = values
    return out


def euler_coefficients(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(f, 1 − f) of the DDIM/Euler step x_{t−1} = f·x_t + (1 − f)·D, f = σ_{t−1}/σ_t."""
    f = sigma_next / sigma
    return f, 1.0 - f


class CompatServer:
    """The server of compat mode: per session a public context and the (plaintext) prompt condition.

    ``max_sessions`` and ``session_ttl`` (s) bound the open sessions as in private mode (:class:`SessionTable`)."""

    def __init__(self, denoiser, *, max_sessions: int = 16, session_ttl: float = 600.0,
                 params=(PRESETS["precise"], PRESETS["reference"])):
        self.denoiser, self.params = denoiser.eval(), tuple(params)
        self.sessions: SessionTable[tuple[TenSEALContext, str, float]] = SessionTable(max_sessions=max_sessions, ttl=session_ttl)

    def open_session(self, public_context: bytes, prompt: str = "", guidance: float = 0.0) -> str:
        ctx = TenSEALContext.from_public_bytes(public_context, allowed=self.params)
        return self.sessions.open((ctx, prompt, float(guidance)))

    def close_session(self, sid: str) -> None:
        self.sessions.close(sid)

    @torch.no_grad()
    def step(self, sid: str, query: dict, frames: list[bytes]) -> list[bytes]:
        """frames = [x_t (float32, plaintext), COO indices (int64), remainder (float64), ciphertexts...];
        returns [r' (float64), updated ciphertexts...]."""
        from ..diffusion import guided_denoiser

        ctx, prompt, guidance = self.sessions.get(sid)
        try:
            sigma, sigma_next = float(query["sigma"]), float(query["sigma_next"])
        except (KeyError, ValueError):
            raise ProtocolError("query parameters sigma and sigma_next must be numbers") from None
        if len(frames) < 3 or not sigma > 0 or not sigma_next >= 0:
            raise ProtocolError("a compat step needs x_t, indices, remainder and ciphertexts, and sigma > 0")
        net = self.denoiser.net
        shape = (1, *net.sample_shape)
        n = int(np.prod(shape))
        if len(frames[0]) != 4 * n or len(frames[2]) != 8 * n or len(frames[1]) % 8:
            raise ProtocolError(f"x_t and remainder must hold {n} values")
        x = torch.from_numpy(np.frombuffer(frames[0], dtype=np.float32).copy()).view(shape)
        idx = np.frombuffer(frames[1], dtype=np.int64)
        rem = np.frombuffer(frames[2], dtype=np.float64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ProtocolError("COO indices out of range")
        # D(x_t; σ) on the plaintext latent, prompt in plaintext: as the published method
        cond = net.conditions(prompts=[prompt] if prompt else None, n=1)
        fn = guided_denoiser(self.denoiser, cond, guidance=guidance, null_label=net.null_condition())
        D = fn(x, torch.full((1,), sigma)).double().reshape(-1).numpy()
        f, g = euler_coefficients(sigma, sigma_next)
        add = g * D
        sizes, off = [], 0
        S = ctx.params.slots
        while off < idx.size:
            sizes.append(min(S, idx.size - off))
            off += S
        if len(frames) - 3 != len(sizes):
            raise ProtocolError(f"{len(frames) - 3} ciphertexts for {idx.size} encrypted values; expected {len(sizes)}")
        cts = [ctx.ciphertext_from_bytes(b, size=s) for b, s in zip(frames[3:], sizes)]
        out = update_encrypted(ctx, cts, f, add[idx])
        return [(f * rem + add).tobytes()] + [c.serialize() for c in out]
