"""Private mode: the server evaluates every weighted layer on ciphertexts, the client everything else.

One round trip per weighted layer (Gazelle-style split, without garbled circuits):

1. the client packs its activation X [P, n_in] (P positions: rows × tokens) into ciphertexts laid out
   for the layer (:func:`layout`), encrypts them under its own key and sends them;
2. the server computes Y = X Wᵀ + b on the ciphertexts with its plaintext (permuted) weights: only
   ct ⊙ pt products and additions (depth 1, no rotation, no key switching) — :meth:`PrivateServer.linear`;
3. the client decrypts, sums the partial sums of each output, and applies the weight-free operations
   (LayerNorm statistics, SiLU, attention softmax-and-mix, residual adds) before the next layer.

**Packing without rotations.** The N/2 slots of a ciphertext hold G copies of the output grid
(P positions × n_out units), M = P·n_out slots each, G = ⌊slots / M⌋. Ciphertext k carries, in copy g,
the input unit i = k·G + g of each position: slot (g, p, o) = x[p, i]; the server multiplies it by
the plaintext W[o, i] in the same slot and sums over k, so copy g of the result holds
Σ_k W[o, kG+g]·x[p, kG+g]. The client adds the G copies: y[p, o] = Σ_i W[o, i]·x[p, i].
A layer costs ⌈n_in/G⌉ ciphertexts up and one down (per block of positions when M > slots).

**Hidden units are permuted per session by the server.** At each session the server draws random
permutations of the residual stream (π_h), of the attention heads and of the units inside each head
(the same one for queries and keys, another for values), and of the MLP units, and applies them to
the rows and columns of its weights (see :func:`permute_layers`). The network computes the same
function, so the client needs no permutation: its operations are elementwise (SiLU, residual adds)
or act on whole groups whose layout it knows (LayerNorm over all H units; softmax over a head's
dot products). What the client decrypts is therefore in an order unknown to it.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .ckks import PRESETS, CKKSParams, TenSEALContext
from .protocol import Deadline, ProtocolError, SessionTable
from ..models.he_net import HECore, HENet, HENetConfig, core_forward, keys_values

__all__ = [
    "Block",
    "layout",
    "pack_inputs",
    "pack_weights",
    "unpack_outputs",
    "permute_layers",
    "PrivateServer",
    "RemoteCore",
    "client_net",
    "ProtocolError",
]


# -- packing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """Positions [start, stop) of one output ciphertext: M = (stop − start)·n_out slots per copy, G copies, K inputs."""

    start: int
    stop: int
    M: int
    G: int
    K: int


def layout(positions: int, n_in: int, n_out: int, slots: int) -> list[Block]:
    """The packing of an n_in → n_out layer over ``positions`` (the same on client and server)."""
    if n_out > slots:
        raise ProtocolError(f"a layer with {n_out} outputs does not fit {slots} slots")
    per = slots // n_out  # positions per output ciphertext
    blocks = []
    for start in range(0, positions, per):
        stop = min(positions, start + per)
        M = (stop - start) * n_out
        G = min(slots // M, n_in)
        blocks.append(Block(start, stop, M, G, math.ceil(n_in / G)))
    return blocks


def pack_inputs(X: np.ndarray, n_out: int, slots: int) -> list[np.ndarray]:
    """Client: X [P, n_in] → the input vectors of every block (slot (g, p, o) of vector k = x[p, kG+g])."""
    P, n_in = X.shape
    out = []
    for blk in layout(P, n_in, n_out, slots):
        Xb = np.zeros((blk.stop - blk.start, blk.K * blk.G))
        Xb[:, :n_in] = X[blk.start : blk.stop]
        Xb = Xb.reshape(-1, blk.K, blk.G).transpose(1, 2, 0)  # [K, G, P_b]
        out += list(np.broadcast_to(Xb[..., None], Xb.shape + (n_out,)).reshape(blk.K, -1))
    return out


def pack_weights(
    W: np.ndarray, b: np.ndarray | None, positions: int, slots: int
) -> list[tuple[list[np.ndarray], np.ndarray | None]]:
    """Server: W [n_out, n_in], b [n_out] → per block, the K plaintext weight vectors and the bias vector."""
    n_out, n_in = W.shape
    out = []
    for blk in layout(positions, n_in, n_out, slots):
        Wp = np.zeros((n_out, blk.K * blk.G))
        Wp[:, :n_in] = W
        Wp = Wp.T.reshape(blk.K, blk.G, 1, n_out)  # [K, G, 1, n_out]: W[o, kG+g]
        Pb = blk.stop - blk.start
        weights = list(np.broadcast_to(Wp, (blk.K, blk.G, Pb, n_out)).reshape(blk.K, -1))
        bias = None
        if b is not None:
            bias = np.zeros((blk.G, Pb, n_out))
            bias[0] = b  # the bias once, in copy 0
            bias = bias.reshape(-1)
        out.append((weights, bias))
    return out


def unpack_outputs(vectors: list[np.ndarray], positions: int, n_in: int, n_out: int, slots: int) -> np.ndarray:
    """Client: the decrypted output vectors → Y [P, n_out] (sum of the G partial-sum copies)."""
    Y = np.zeros((positions, n_out))
    for blk, v in zip(layout(positions, n_in, n_out, slots), vectors):
        Y[blk.start : blk.stop] = v[: blk.G * blk.M].reshape(blk.G, blk.stop - blk.start, n_out).sum(0)
    return Y


# -- the server ---------------------------------------------------------------------------------
def permute_layers(core: HECore, rng: np.random.Generator | None) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The core's weights (W [n_out, n_in], b) with hidden units permuted by fresh random permutations
    (``rng`` None: unpermuted). Row j of a permuted W is row π[j] of the original: outputs in π's order;
    columns follow the permutation of the layer's input. The function computed is unchanged."""
    cfg = core.config
    H, d, n_h = cfg.width, cfg.head_dim, cfg.heads
    ident = lambda n: np.arange(n)  # noqa: E731
    perm = ident if rng is None else rng.permutation

    W = {
        n: (
            m.weight.detach().double().cpu().numpy(),
            None if m.bias is None else m.bias.detach().double().cpu().numpy(),
        )
        for n, m in core.layers().items()
    }
    pi_h = perm(H)
    out = {"in": (W["in"][0][pi_h], W["in"][1][pi_h]), "out": (W["out"][0][:, pi_h], W["out"][1])}
    for b in range(cfg.blocks):
        heads = perm(n_h)
        pi_qk = np.concatenate([h * d + perm(d) for h in heads])  # q and k: the same heads, the same units
        pi_v = np.concatenate([h * d + perm(d) for h in heads])  # v: the same heads, its own units
        pi_f = perm(cfg.mlp_ratio * H)
        out[f"q{b}"] = (W[f"q{b}"][0][pi_qk][:, pi_h], None)
        out[f"k{b}"] = (W[f"k{b}"][0][pi_qk], None)
        out[f"v{b}"] = (W[f"v{b}"][0][pi_v], None)
        out[f"o{b}"] = (W[f"o{b}"][0][pi_h][:, pi_v], W[f"o{b}"][1][pi_h])
        out[f"fc1_{b}"] = (W[f"fc1_{b}"][0][pi_f][:, pi_h], W[f"fc1_{b}"][1][pi_f])
        out[f"fc2_{b}"] = (W[f"fc2_{b}"][0][pi_h][:, pi_f], W[f"fc2_{b}"][1][pi_h])
    return out


@dataclass
class _Session:
    context: TenSEALContext
    weights: dict[str, tuple[np.ndarray, np.ndarray | None]]
    packed: dict


class PrivateServer:
    """The server of private mode: the denoiser core's weights, one CKKS public context and one set of
    permutations per session; never a secret key, never a plaintext activation.

    What one request may ask is what the client's forward pass sends (:func:`core_forward`): one
    layer over ``R`` positions, or the stacked keys and values of all blocks over ``R·T`` positions
    (T = ``context_tokens``, the length of the conditioning; None: any T ≤ 64), with 1 ≤ R ≤
    ``max_rows`` (2: one image with guidance). Anything else is refused, so a request carries at most
    a few dozen ciphertexts and the packed-weight cache of a session stays small.
    ``sessions``: the session table (default: ``max_sessions``/``session_ttl``, no per-client limit).
    Thread-safe."""

    def __init__(
        self,
        core: HECore,
        *,
        params: tuple[CKKSParams, ...] = (PRESETS["precise"],),
        permute: bool = True,
        max_sessions: int = 16,
        session_ttl: float = 600.0,
        max_rows: int = 2,
        context_tokens: int | None = None,
        sessions: SessionTable | None = None,
    ):
        if max_rows < 1 or (context_tokens is not None and context_tokens < 1):
            raise ValueError(f"max_rows and context_tokens must be >= 1, got {max_rows} and {context_tokens}")
        self.core, self.params, self.permute = core.eval(), tuple(params), permute
        self.max_rows, self.context_tokens = int(max_rows), context_tokens
        self.max_positions = self.max_rows * (context_tokens or 64)
        self.shapes = {n: (m.out_features, m.in_features) for n, m in core.layers().items()}
        self.kv_names = tuple(n for b in range(core.config.blocks) for n in (f"k{b}", f"v{b}"))
        self.sessions: SessionTable[_Session] = (
            sessions if sessions is not None else SessionTable(max_sessions=max_sessions, ttl=session_ttl)
        )

    def spec(self) -> dict:
        """What a client needs to run its part: sizes of the network and of every layer (no weights)."""
        from dataclasses import asdict

        return {
            "config": asdict(self.core.config),
            "latent_shape": list(self.core.latent_shape),
            "context_width": self.core.context_width,
            "layers": {n: list(s) for n, s in self.shapes.items()},
            "ckks": [p.to_dict() for p in self.params],
        }

    def new_session(self, public_context: bytes, deadline: Deadline | None = None) -> _Session:
        """A session's state: the client's public context (no secret key; checked before it is loaded)
        and the session's permuted weights."""
        ctx = TenSEALContext.from_public_bytes(public_context, allowed=self.params)
        if deadline is not None:
            deadline.check()
        rng = np.random.default_rng(secrets.randbits(128)) if self.permute else None
        with torch.no_grad():
            weights = permute_layers(self.core, rng)
        return _Session(ctx, weights, {})

    def open_session(self, public_context: bytes, *, owner: str | None = None) -> str:
        """Register a client's public context and draw the session's permutations; returns its token."""
        return self.sessions.open_with(lambda: self.new_session(public_context), owner=owner)

    def close_session(self, sid: str, *, owner: str | None = None) -> None:
        self.sessions.close(sid, owner=owner)

    def expected(self, names: tuple[str, ...], positions: int, *, slots: int) -> list[int]:
        """Sizes of the ciphertexts a request for ``names`` over ``positions`` must carry;
        :class:`ProtocolError` for anything the client's forward pass does not ask."""
        if names == self.kv_names:
            T = self.context_tokens
            ok = 1 <= positions <= self.max_positions and (T is None or positions % T == 0)
            allowed = f"a multiple of {T} up to {self.max_positions}" if T else f"1 to {self.max_positions}"
        elif len(names) == 1 and names[0] in self.shapes:
            ok, allowed = 1 <= positions <= self.max_rows, f"1 to {self.max_rows}"
        else:
            raise ProtocolError(
                f"layers must be one of {', '.join(self.shapes)} or the stack {','.join(self.kv_names)}; "
                f"got {','.join(names)[:200]!r}"
            )
        if not ok:
            raise ProtocolError(f"positions for layer(s) {','.join(names)} must be {allowed}, got {positions}")
        n_out, n_in = sum(self.shapes[n][0] for n in names), self.shapes[names[0]][1]
        return [blk.G * blk.M for blk in layout(positions, n_in, n_out, slots) for _ in range(blk.K)]

    def linear(
        self,
        sid: str,
        names: tuple[str, ...],
        positions: int,
        ciphertexts: list[bytes],
        *,
        owner: str | None = None,
        deadline: Deadline | None = None,
    ) -> list[bytes]:
        """Y = X Wᵀ + b for the stacked layers ``names`` on the packed ciphertexts of X (see module docstring)."""
        with self.sessions.use(sid, owner=owner) as s:
            return self.compute(s, names, positions, ciphertexts, deadline)

    def compute(
        self,
        s: _Session,
        names: tuple[str, ...],
        positions: int,
        ciphertexts: list[bytes],
        deadline: Deadline | None = None,
    ) -> list[bytes]:
        """:meth:`linear` on a session's state; ``deadline`` is checked between homomorphic operations."""
        check = deadline.check if deadline is not None else (lambda: None)
        ctx, slots = s.context, s.context.params.slots
        sizes = self.expected(names, positions, slots=slots)
        if len(ciphertexts) != len(sizes):
            raise ProtocolError(
                f"{len(ciphertexts)} ciphertexts for layer(s) {','.join(names)} over {positions} positions; expected {len(sizes)}"
            )
        for c, n in zip(ciphertexts, sizes):  # every envelope before any work; each is loaded when it is used,
            ctx.check_ciphertext_bytes(c, size=n, fresh=True)  # so a request holds a few ciphertexts at a time
        key = (names, positions)
        packed = s.packed.get(key)
        if packed is None:
            W = np.concatenate([s.weights[n][0] for n in names])
            bs = [s.weights[n][1] for n in names]
            b = (
                None
                if all(x is None for x in bs)
                else np.concatenate([np.zeros(self.shapes[n][0]) if x is None else x for n, x in zip(names, bs)])
            )
            packed = s.packed[key] = pack_weights(W, b, positions, slots)
        out, i = [], 0
        for weights, bias in packed:
            # Σ_k ct_k ⊙ W_k (+ b): depth 1. An all-zero W_k adds nothing and is skipped (its product
            # would be SEAL's "transparent" ciphertext, at another level than the other terms).
            acc = None
            for w in weights:
                check()
                ct = ctx.ciphertext_from_bytes(ciphertexts[i], size=sizes[i], fresh=True)
                if w.any():
                    term = ctx.mul_plain(ct, w)
                    acc = term if acc is None else ctx.add(acc, term)
                i += 1
            if acc is None:  # a block of zero weights: its output is the bias
                acc = ctx.encrypt(bias if bias is not None else np.zeros(len(weights[0])))
            elif bias is not None:
                acc = ctx.add_plain(acc, bias)
            out.append(acc.serialize())
        return out


# -- the client ---------------------------------------------------------------------------------
class RemoteCore(nn.Module):
    """The client's stand-in for :class:`HECore`: the same forward (:func:`core_forward`), with every
    weighted layer a round trip ``send(names, positions, ciphertexts) -> ciphertexts`` on ciphertexts
    under the client's key. Keys and values of the prompt are computed once per context (cached)."""

    def __init__(self, spec: dict, context: TenSEALContext, send):
        super().__init__()
        self.config, self.latent_shape = HENetConfig(**spec["config"]), tuple(spec["latent_shape"])
        self.context_width, self.shapes = int(spec["context_width"]), {n: tuple(s) for n, s in spec["layers"].items()}
        self.ctx, self.send = context, send
        self._kv: dict[str, list] = {}
        self.rounds, self.bytes_up, self.bytes_down = 0, 0, 0

    def linear(self, names: tuple[str, ...], a: Tensor) -> Tensor:
        n_out, n_in = sum(self.shapes[n][0] for n in names), self.shapes[names[0]][1]
        X = a.reshape(-1, n_in).detach().double().cpu().numpy()
        slots = self.ctx.params.slots
        up = [self.ctx.encrypt(v).serialize() for v in pack_inputs(X, n_out, slots)]
        down = self.send(names, X.shape[0], up)
        self.rounds += 1
        self.bytes_up += sum(map(len, up))
        self.bytes_down += sum(map(len, down))
        vecs = [self.ctx.decrypt(self.ctx.ciphertext_from_bytes(c)) for c in down]
        Y = unpack_outputs(vecs, X.shape[0], n_in, n_out, slots)
        return torch.from_numpy(Y).to(a.dtype).reshape(*a.shape[:-1], n_out)

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor) -> Tensor:
        key = hashlib.sha256(context.detach().cpu().numpy().tobytes()).hexdigest()
        if key not in self._kv:
            self._kv[key] = keys_values(self.config, context, self.linear)
        return core_forward(self.config, self.latent_shape, x, c_noise, self._kv[key], self.linear)


def client_net(spec: dict, conditioner: HENet | nn.Module, context: TenSEALContext, send) -> HENet:
    """The client's network: its own class embedder and text encoder (the prompt never leaves the
    client) around a :class:`RemoteCore`; use it like the plaintext ``HENet`` (e.g. ``stages.generate``)."""
    return HENet(RemoteCore(spec, context, send), conditioner.class_embedder, conditioner.text_encoder)
