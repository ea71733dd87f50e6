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

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .ckks import PRESETS, Ciphertext, TenSEALContext
from .protocol import Deadline, ProtocolError, SessionTable

__all__ = [
    "hill_cost",
    "select_encrypted",
    "coo_pack",
    "encrypt_packed",
    "update_encrypted",
    "merge",
    "CompatServer",
    "euler_coefficients",
]

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
    return [ctx.encrypt(values[i : i + S]) for i in range(0, len(values), S)]


def update_encrypted(ctx: TenSEALContext, cts: list[Ciphertext], factor: float, add: np.ndarray) -> list[Ciphertext]:
    """enc ← enc·f + a, chunk by chunk (one ct × scalar and one ct + pt per ciphertext)."""
    out, off = [], 0
    for ct in cts:
        n = ct.size
        out.append(ctx.add_plain(ctx.mul_plain(ct, np.full(n, factor)), add[off : off + n]))
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


@dataclass
class _CompatSession:
    context: TenSEALContext
    cond: Tensor  # the prompt's condition row (plaintext, as published)
    guidance: float


class CompatServer:
    """The server of compat mode: per session a public context and the (plaintext) prompt condition.

    Every field of a request is checked before anything is computed: the prompt (printable, at most
    ``MAX_PROMPT`` characters) and guidance (finite, in ``GUIDANCE_RANGE``) at open; σ_t, σ_{t−1}
    (finite, 0 < σ_t ≤ ``sigma_max``, 0 ≤ σ_{t−1} ≤ σ_t), x_t and the remainder (finite, |·| ≤
    ``VALUE_MAX``, the latent's size), the COO indices (strictly increasing, in range, zero in the
    remainder) and exactly ⌈|M|/slots⌉ fresh ciphertexts at each step. ``sessions``: the session
    table (default: ``max_sessions``/``session_ttl``, no per-client limit)."""

    MAX_PROMPT = 1000
    GUIDANCE_RANGE = (-1.0, 100.0)
    VALUE_MAX = 1e4  # far beyond a latent (|x_t| ≲ 6σ_max); |v|·Δ stays far below every accepted chain's modulus

    def __init__(
        self,
        denoiser,
        *,
        max_sessions: int = 16,
        session_ttl: float = 600.0,
        params=(PRESETS["precise"], PRESETS["reference"]),
        sigma_max: float = 80.0,
        sessions: SessionTable | None = None,
    ):
        self.denoiser, self.params, self.sigma_max = denoiser.eval(), tuple(params), float(sigma_max)
        self.sessions: SessionTable[_CompatSession] = (
            sessions if sessions is not None else SessionTable(max_sessions=max_sessions, ttl=session_ttl)
        )
        self.n = int(np.prod(self.denoiser.net.sample_shape))

    def max_ciphertexts(self) -> int:
        """The most ciphertexts one step can carry (every element encrypted, the fewest slots)."""
        return -(-self.n // min(p.slots for p in self.params))

    @classmethod
    def check_open(cls, prompt: object, guidance: object) -> tuple[str, float]:
        """(prompt, guidance) of a session, or :class:`ProtocolError`."""
        if not isinstance(prompt, str) or len(prompt) > cls.MAX_PROMPT or not prompt.isprintable():
            raise ProtocolError(f"prompt must be printable text of at most {cls.MAX_PROMPT} characters")
        lo, hi = cls.GUIDANCE_RANGE
        try:
            g = float(guidance)
        except (TypeError, ValueError):
            raise ProtocolError(f"guidance must be a number, got {str(guidance)[:40]!r}") from None
        if not (math.isfinite(g) and lo <= g <= hi):
            raise ProtocolError(f"guidance must be a finite number in [{lo:g}, {hi:g}], got {g!r}")
        return prompt, g

    def check_sigmas(self, query: dict) -> tuple[float, float]:
        """(σ_t, σ_{t−1}) of a step's query, or :class:`ProtocolError`."""
        if set(query) != {"sigma", "sigma_next"}:
            raise ProtocolError(
                f"a compat step takes the query parameters sigma and sigma_next only, got {sorted(query)}"
            )
        try:
            sigma, sigma_next = float(query["sigma"]), float(query["sigma_next"])
        except (TypeError, ValueError):
            raise ProtocolError("query parameters sigma and sigma_next must be numbers") from None
        top = self.sigma_max * (1 + 1e-6)
        if not (math.isfinite(sigma) and 0 < sigma <= top):
            raise ProtocolError(f"sigma must be in (0, {self.sigma_max:g}] (the sampler's sigma_max), got {sigma!r}")
        if not (math.isfinite(sigma_next) and 0 <= sigma_next <= sigma):
            raise ProtocolError(f"sigma_next must be in [0, sigma] = [0, {sigma:g}], got {sigma_next!r}")
        return sigma, sigma_next

    def new_session(
        self, public_context: bytes, prompt: str = "", guidance: float = 0.0, deadline: Deadline | None = None
    ) -> _CompatSession:
        prompt, guidance = self.check_open(prompt, guidance)
        ctx = TenSEALContext.from_public_bytes(public_context, allowed=self.params)
        net = self.denoiser.net
        return _CompatSession(ctx, net.conditions(prompts=[prompt] if prompt else None, n=1), guidance)

    def open_session(
        self, public_context: bytes, prompt: str = "", guidance: float = 0.0, *, owner: str | None = None
    ) -> str:
        return self.sessions.open_with(lambda: self.new_session(public_context, prompt, guidance), owner=owner)

    def close_session(self, sid: str, *, owner: str | None = None) -> None:
        self.sessions.close(sid, owner=owner)

    def step(
        self, sid: str, query: dict, frames: list[bytes], *, owner: str | None = None, deadline: Deadline | None = None
    ) -> list[bytes]:
        """frames = [x_t (float32, plaintext), COO indices (int64), remainder (float64), ciphertexts...];
        returns [r' (float64), updated ciphertexts...]."""
        with self.sessions.use(sid, owner=owner) as s:
            return self.compute(s, self.check_sigmas(query), frames, deadline)

    @torch.no_grad()
    def compute(
        self, s: _CompatSession, sigmas: tuple[float, float], frames: list[bytes], deadline: Deadline | None = None
    ) -> list[bytes]:
        """:meth:`step` on a session's state with checked (σ_t, σ_{t−1})."""
        from ..diffusion import guided_denoiser

        check = deadline.check if deadline is not None else (lambda: None)
        sigma, sigma_next = sigmas
        ctx, n = s.context, self.n
        if len(frames) < 3:
            raise ProtocolError("a compat step needs x_t, indices, remainder and ciphertexts")
        if len(frames[0]) != 4 * n or len(frames[2]) != 8 * n or len(frames[1]) % 8 or len(frames[1]) > 8 * n:
            raise ProtocolError(f"x_t and remainder must hold {n} values, the indices at most {n}")
        x_np = np.frombuffer(frames[0], dtype="<f4").astype(np.float64)
        idx = np.frombuffer(frames[1], dtype="<i8")
        rem = np.frombuffer(frames[2], dtype="<f8")
        for name, v in (("x_t", x_np), ("remainder", rem)):
            if not (np.isfinite(v).all() and np.abs(v).max(initial=0) <= self.VALUE_MAX):
                raise ProtocolError(f"{name} must be finite with |values| <= {self.VALUE_MAX:g}")
        if idx.size and (idx[0] < 0 or idx[-1] >= n or (np.diff(idx) <= 0).any()):
            raise ProtocolError(f"COO indices must be strictly increasing in [0, {n})")
        if idx.size and (rem[idx] != 0).any():
            raise ProtocolError("the remainder must be zero at the encrypted (COO) positions")
        S = ctx.params.slots
        sizes = [min(S, idx.size - off) for off in range(0, idx.size, S)]
        if len(frames) - 3 != len(sizes):
            raise ProtocolError(f"{len(frames) - 3} ciphertexts for {idx.size} encrypted values; expected {len(sizes)}")
        cts = []
        for b, size in zip(frames[3:], sizes):
            check()
            cts.append(ctx.ciphertext_from_bytes(b, size=size, fresh=True))
        check()
        # D(x_t; σ) on the plaintext latent, prompt in plaintext: as the published method
        net = self.denoiser.net
        x = torch.from_numpy(x_np).float().view(1, *net.sample_shape)
        fn = guided_denoiser(self.denoiser, s.cond, guidance=s.guidance, null_label=net.null_condition())
        D = fn(x, torch.full((1,), sigma)).double().reshape(-1).numpy()
        f, g = euler_coefficients(sigma, sigma_next)
        add = g * D
        if not (np.isfinite(add).all() and np.abs(add).max(initial=0) <= self.VALUE_MAX):
            raise ProtocolError("the denoiser's output at this x_t and sigma is out of range")
        out, off, a = [], 0, add[idx]
        for ct in cts:
            check()
            out += update_encrypted(ctx, [ct], f, a[off : off + ct.size])
            off += ct.size
        return [(f * rem + add).tobytes()] + [c.serialize() for c in out]
