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

On a Stable-Diffusion-style pipeline (:class:`PipelineCompatServer`, ``privdiff he serve --pipeline DIR``)
step 3 is the published sampler, PLMS (diffusers' ``PNDMScheduler`` with ``skip_prk_steps``, as SD's
pipeline runs it): the server runs CLIP and the UNet (with classifier-free guidance) on the plaintext
x_t, keeps the ε history, and the update x_{t−δ} = f·x_t + g·e' is again affine in x_t once the
Adams–Bashforth combination e' of that history is known (:func:`plms_coefficients`,
:func:`plms_update`). Both servers share everything else: one (f, a) per step, applied to the
ciphertexts and the remainder by :meth:`CompatServer.compute`.

The server sees x_t, D, the prompt, M and r at every step: compat mode hides nothing from it (see
docs/he.md). The encryption only protects what is already in plaintext on the same server.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .ckks import PRESETS, Ciphertext, TenSEALContext
from .protocol import Deadline, ProtocolError, SessionTable

if TYPE_CHECKING:
    from ..models.pretrained import TextUNetNet

__all__ = [
    "hill_cost",
    "select_encrypted",
    "coo_pack",
    "encrypt_packed",
    "update_encrypted",
    "merge",
    "CompatServer",
    "PipelineCompatServer",
    "PLMSSchedule",
    "adams_bashforth",
    "euler_coefficients",
    "plms_coefficients",
    "plms_update",
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


# -- PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"), as an affine map of x_t ----
def plms_coefficients(alpha_t: float, alpha_prev: float, *, prediction_type: str = "epsilon") -> tuple[float, float]:
    """(f, g) of PNDM's transfer x_{t−δ} = f·x_t + g·out' (Liu et al. 2022, eq. 9; diffusers'
    ``PNDMScheduler._get_prev_sample``) for ᾱ_t = ``alpha_t``, ᾱ_{t−δ} = ``alpha_prev`` and the net's
    combined output out' (ε', or v' for a v-prediction net). Equal to DDIM with η = 0 (Song et al. 2021)."""
    a_t, a_p = float(alpha_t), float(alpha_prev)
    # x_t's coefficient: √(ᾱ_{t−δ}/ᾱ_t)
    c_x = math.sqrt(a_p / a_t)
    # ε's coefficient: (ᾱ_{t−δ} − ᾱ_t) / (ᾱ_t·√(1 − ᾱ_{t−δ}) + √(ᾱ_t·(1 − ᾱ_t)·ᾱ_{t−δ}))
    c_e = (a_p - a_t) / (a_t * math.sqrt(1 - a_p) + math.sqrt(a_t * (1 - a_t) * a_p))
    if prediction_type == "epsilon":
        # x_{t−δ} = c_x·x_t − c_e·ε'
        return c_x, -c_e
    if prediction_type == "v_prediction":
        # ε' = √ᾱ_t·v' + √(1 − ᾱ_t)·x_t, so x_{t−δ} = (c_x − c_e·√(1 − ᾱ_t))·x_t − c_e·√ᾱ_t·v'
        return c_x - c_e * math.sqrt(1 - a_t), -c_e * math.sqrt(a_t)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def adams_bashforth(history: list[Tensor]) -> Tensor:
    """PLMS's linear-multistep combination e' of the last (up to four) outputs, oldest first (Liu et al. 2022):
    2nd order (3e − e₋₁)/2, 3rd (23e − 16e₋₁ + 5e₋₂)/12, 4th (55e − 59e₋₁ + 37e₋₂ − 9e₋₃)/24."""
    e = history[-4:]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[1] - e[0]) / 2
    if len(e) == 3:
        return (23 * e[2] - 16 * e[1] + 5 * e[0]) / 12
    return (55 * e[3] - 59 * e[2] + 37 * e[1] - 9 * e[0]) / 24


@dataclass(frozen=True)
class PLMSSchedule:
    """PLMS as Stable Diffusion's pipeline runs it: diffusers' ``PNDMScheduler`` with ``skip_prk_steps`` on the
    pipeline's scheduler config, ``steps`` updates over ``steps + 1`` net calls at ``timesteps`` (its
    ``timesteps`` list), δ = T // steps, ᾱ of its table (``final_alpha`` below t = 0)."""

    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]
    final_alpha: float
    delta: int
    prediction_type: str

    @classmethod
    def from_config(cls, config: dict, *, steps: int) -> "PLMSSchedule":
        """The schedule of ``steps`` PLMS updates on a pipeline's scheduler ``config`` (whatever class it names)."""
        from ..diffusion.schedulers import make_scheduler

        sched = make_scheduler("pndm", config)
        T = int(sched.config.num_train_timesteps)
        if not 2 <= steps <= T // 2:
            raise ValueError(f"PLMS needs 2 to {T // 2} steps on this pipeline's {T} timesteps, got {steps}")
        sched.set_timesteps(steps)
        out = cls(
            tuple(int(t) for t in sched.timesteps),
            tuple(float(a) for a in sched.alphas_cumprod.double()),
            float(sched.final_alpha_cumprod),
            T // steps,
            str(sched.config.prediction_type),
        )
        L = out.timesteps  # ᾱ is read at L[0], L[1] + δ and every L[i] (and δ below them)
        if len(L) != steps + 1 or max(L[0], L[1] + out.delta) >= T or min(L) < 0:
            raise ValueError(f"{config.get('_class_name')} config: its timesteps do not allow PLMS at {steps} steps")
        return out

    @property
    def steps(self) -> int:
        return len(self.timesteps) - 1

    def alpha(self, t: int) -> float:
        """ᾱ_t (the final ᾱ below t = 0)."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha


def plms_update(
    schedule: PLMSSchedule, i: int, x: Tensor, *, predict: Callable[[Tensor, int], Tensor], history: list[Tensor]
) -> tuple[float, Tensor]:
    """(f, a) of PLMS update ``i`` (0-based, of ``schedule.steps``): x_next = f·x + a, with ``predict(x, t)`` the
    (guided) net output at timestep t. ``history`` holds the outputs of updates 0..i−1, each at its x_t; this
    update's output at x is appended (the caller keeps it for the next update). Equal to diffusers'
    ``PNDMScheduler.step`` (skip_prk_steps) on the same outputs. f depends on the schedule alone and a on x only
    through the net's outputs (computed in plaintext), so x_next = f·x + a applies as it is to an encrypted x."""
    L, d, kind = schedule.timesteps, schedule.delta, schedule.prediction_type
    if i == 0:
        # first update: PNDM's pseudo improved Euler (Liu et al. 2022; CompVis' PLMS first step)
        e0 = predict(x, L[0])
        history[:] = [e0]
        # an intermediate DDIM step x̂ = f̂·x + ĝ·e₀ to t − δ, in plaintext (as in the reference code)
        f_hat, g_hat = plms_coefficients(schedule.alpha(L[0]), schedule.alpha(L[0] - d), prediction_type=kind)
        x_hat = f_hat * x + g_hat * e0
        # e' = (e₀ + e(x̂, t − δ))/2
        combined = (e0 + predict(x_hat, L[1])) / 2
        t, t_prev = L[1] + d, L[1]
    else:
        # later updates: Adams–Bashforth over this update's output and up to three before it
        history.append(predict(x, L[i + 1]))
        combined = adams_bashforth(history)
        t, t_prev = L[i + 1], L[i + 1] - d
    # x_{t−δ} = f·x_t + g·e'
    f, g = plms_coefficients(schedule.alpha(t), schedule.alpha(t_prev), prediction_type=kind)
    return f, g * combined


@dataclass
class _CompatSession:
    context: TenSEALContext
    cond: Tensor  # the prompt's condition row (plaintext, as published)
    guidance: float


@dataclass
class _PipelineSession(_CompatSession):
    schedule: PLMSSchedule | None = None
    history: list[Tensor] = field(default_factory=list)  # the net's (guided) output at each update's x_t


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
    OPEN_PARAMS: tuple[str, ...] = ("prompt", "guidance")  # query parameters of a session's opening
    STEP_PARAMS: tuple[str, ...] = ("sigma", "sigma_next")  # query parameters of a step
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

    def check_open_query(self, query: dict) -> dict:
        """The keyword arguments of :meth:`new_session` from an opening's query (``mode`` excluded), or
        :class:`ProtocolError`."""
        extra = sorted(set(query) - set(self.OPEN_PARAMS))
        if extra:
            raise ProtocolError(
                f"a compat session of this server takes {', '.join(self.OPEN_PARAMS)}, not {', '.join(extra)}"
            )
        prompt, guidance = self.check_open(query.get("prompt", ""), query.get("guidance", "0"))
        return {"prompt": prompt, "guidance": guidance}

    def check_step(self, query: dict):
        """The key of a step (what :meth:`coefficients` reads) from its query, or :class:`ProtocolError`."""
        return self.check_sigmas(query)

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
            return self.compute(s, self.check_step(query), frames, deadline)

    def coefficients(
        self, s: _CompatSession, x: np.ndarray, key: tuple[float, float], check: Callable[[], None]
    ) -> tuple[float, np.ndarray]:
        """(f, a) of the step x_{t−1} = f·x_t + a at the plaintext x_t (flat float64): DDIM (Euler in σ-space),
        f = σ_{t−1}/σ_t and a = (1 − f)·D(x_t; σ_t) with the prompt and guidance of the session."""
        from ..diffusion import guided_denoiser

        sigma, sigma_next = key
        # D(x_t; σ) on the plaintext latent, prompt in plaintext: as the published method
        net = self.denoiser.net
        xt = torch.from_numpy(x).float().view(1, *net.sample_shape)
        fn = guided_denoiser(self.denoiser, s.cond, guidance=s.guidance, null_label=net.null_condition())
        D = fn(xt, torch.full((1,), sigma)).double().reshape(-1).numpy()
        f, g = euler_coefficients(sigma, sigma_next)
        return f, g * D

    @torch.no_grad()
    def compute(self, s: _CompatSession, key, frames: list[bytes], deadline: Deadline | None = None) -> list[bytes]:
        """:meth:`step` on a session's state with a checked step key (:meth:`check_step`)."""
        check = deadline.check if deadline is not None else (lambda: None)
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
        # the step's (f, a), computed by the server on the plaintext x_t (as published)
        f, add = self.coefficients(s, x_np, key, check)
        if not (np.isfinite(add).all() and np.abs(add).max(initial=0) <= self.VALUE_MAX):
            raise ProtocolError("the denoiser's output at this x_t and sigma is out of range")
        out, off, a = [], 0, add[idx]
        for ct in cts:
            check()
            out += update_encrypted(ctx, [ct], f, a[off : off + ct.size])
            off += ct.size
        return [(f * rem + add).tobytes()] + [c.serialize() for c in out]


class PipelineCompatServer(CompatServer):
    """Compat mode on a Stable-Diffusion-style pipeline (``privdiff he serve --pipeline DIR``): HE-Diffusion as
    published, with PLMS. Per session: the public context, the prompt's token ids (plaintext: CLIP runs here),
    the guidance w (the pipeline's guidance scale is 1 + w), the number of PLMS updates and the net's outputs
    so far. Update ``i`` (``?step=i``, in order; repeating the last one recomputes it) runs the UNet on the
    plaintext x_t (twice for update 0: PNDM's pseudo improved Euler) and applies x_{t−δ} = f·x_t + a to the
    ciphertexts and the remainder (:func:`plms_update`).

    ``net``: :func:`privdiff.models.pretrained.load_text_pipeline`'s net (the UNet, CLIP and tokenizer, the
    pipeline's scheduler config); ``device``: where the UNet runs (default: CPU)."""

    OPEN_PARAMS = ("prompt", "guidance", "steps")
    STEP_PARAMS = ("step",)

    def __init__(
        self,
        net: "TextUNetNet",
        *,
        device: torch.device | str | None = None,
        max_sessions: int = 16,
        session_ttl: float = 600.0,
        params=(PRESETS["precise"], PRESETS["reference"]),
        sessions: SessionTable | None = None,
    ):
        from ..diffusion.discrete import VPDenoiser

        self.device = torch.device(device or "cpu")
        super().__init__(
            VPDenoiser(net.to(self.device), schedule=net.schedule),
            max_sessions=max_sessions,
            session_ttl=session_ttl,
            params=params,
            sessions=sessions,
        )
        self.scheduler_config = net.scheduler_config
        self.max_steps = int(self.scheduler_config.get("num_train_timesteps", 1000)) // 2
        PLMSSchedule.from_config(
            self.scheduler_config, steps=2
        )  # a config PLMS cannot run on fails at load, not per session

    def check_open_query(self, query: dict) -> dict:
        steps = query.get("steps", "50")
        if not (steps.isascii() and steps.isdigit() and len(steps) <= 9 and 2 <= int(steps) <= self.max_steps):
            raise ProtocolError(f"steps must be an integer in [2, {self.max_steps}], got {steps[:40]!r}")
        return super().check_open_query({k: v for k, v in query.items() if k != "steps"}) | {"steps": int(steps)}

    def check_step(self, query: dict) -> int:
        if set(query) != {"step"}:
            raise ProtocolError(f"a PLMS compat step takes the query parameter step only, got {sorted(query)}")
        i = query["step"]
        if not (i.isascii() and i.isdigit() and len(i) <= 9):
            raise ProtocolError(f"step must be an integer >= 0, got {i[:40]!r}")
        return int(i)

    def new_session(
        self,
        public_context: bytes,
        prompt: str = "",
        guidance: float = 0.0,
        deadline: Deadline | None = None,
        *,
        steps: int = 50,
    ) -> _PipelineSession:
        prompt, guidance = self.check_open(prompt, guidance)
        try:
            schedule = PLMSSchedule.from_config(self.scheduler_config, steps=int(steps))
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        ctx = TenSEALContext.from_public_bytes(public_context, allowed=self.params)
        cond = self.denoiser.net.conditions(prompts=[prompt], n=1)
        return _PipelineSession(ctx, cond, guidance, schedule)

    def coefficients(
        self, s: _PipelineSession, x: np.ndarray, key: int, check: Callable[[], None]
    ) -> tuple[float, np.ndarray]:
        """(f, a) of PLMS update ``key`` at the plaintext x_t: the UNet with the prompt (and guidance) on x_t."""
        from ..diffusion import guided_denoiser
        from ..diffusion.schedulers import model_output

        i, done = key, len(s.history)
        if i >= s.schedule.steps:
            raise ProtocolError(f"step must be in [0, {s.schedule.steps}) (this session's PLMS steps), got {i}")
        if i > done:
            raise ProtocolError(f"step {i} before step {done}: PLMS updates run in order")
        net = self.denoiser.net
        fn = guided_denoiser(
            self.denoiser, s.cond.to(self.device), guidance=s.guidance, null_label=net.null_condition()
        )

        def predict(xt: Tensor, t: int) -> Tensor:
            check()
            # ε̂ (or v̂) of the UNet at its input x_t and timestep t, guided: e_∅ + (1 + w)·(e_c − e_∅)
            return model_output(fn, schedule=self.denoiser.schedule, x_in=xt, t=t)

        xt = torch.from_numpy(x).float().view(1, *net.sample_shape).to(self.device)
        history = s.history[:i]  # a repeated update recomputes its output; later ones are dropped
        f, a = plms_update(s.schedule, i, xt, predict=predict, history=history)
        s.history = history
        return f, a.double().reshape(-1).cpu().numpy()
