"""Per-example clipping in one backward pass: book-keeping with mixed ghost norms.

The clipped sum Σ_b min(1, C/‖g_b‖)·g_b needs every example's gradient norm ‖g_b‖ before it
can weight the examples. Opacus materialises per-row gradients (hooks) or re-runs the backward
(ghost clipping). Book-keeping (BK; Bu, Wang, Zha & Karypis, ICML 2023) needs neither: for a
layer out = f(a; W), the gradient of example b is a function of its input activations a_b and
output gradients g_b = ∂L/∂out_b alone, so one backward pass that yields (a, g) per layer gives

1. the per-example squared norm of every layer, either *ghost* — ⟨a_b a_bᵀ, g_b g_bᵀ⟩ over the
   layer's positions, no gradient formed (Li et al. 2021) — or *direct* — the per-example
   gradient itself, whichever is cheaper for the layer's shape (mixed ghost clipping, Bu et al.
   2022);
2. the clip factors c_b = min(1, C / (‖g_b‖ + 10⁻⁶)) (Opacus' formula);
3. the clipped sum, per layer: Σ_b c_b·(per-example gradient) for direct layers, or ONE weighted
   gradient with c-scaled output gradients, e.g. aᵀ(c∘g), for ghost layers.

The backward pass asks autograd only for the gradients of the first layers' *outputs*, so it
never computes the (non-private) parameter gradients at all: the private step's extra work over
a non-private one is the per-example gradient instead of the batch gradient.

Noise multiplicity K: rows b·K … b·K+K−1 are example b's K noise draws (sample-major), so each
layer's per-example quantities are taken over K·T positions — the K draws are summed inside the
contraction, and no [B·K, parameters] tensor ever exists: memory does not grow with K.

Supported trainable layers: Linear, Conv1d/2d/3d (any stride, padding, dilation, groups; zero
padding), GroupNorm, LayerNorm, Embedding, in float32/float64. Errors, never a silent miscount
(a parameter missing from ‖g_b‖ but present in the update would break the sensitivity the
accountant assumes): a trainable parameter outside those layers, one shared by two layers or
frozen after construction, a layer called twice in one forward, an input changed in place, a
layer whose output gradient never arrives, and any layer that mixes examples (BatchNorm).
Contracts the caller keeps: rows are sample-major (``denoising_loss`` builds them so), and a
weight is used only through its module's forward — a weight read directly (``F.linear(x,
m.weight)``) is invisible to the hooks, so that path is missing from both the norm and the
update (private, but not trained). privdiff's UNets satisfy both (tests against one example at a
time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]  # trainable direct parameters ("weight", "bias")
    calls: int = 0  # forward calls recorded in the current chunk
    processed: int = 0  # output gradients processed in the current chunk
    # what the clipped sum needs once the clip factors are known
    direct: dict[str, Tensor] = field(default_factory=dict)  # per-example gradients [B, *shape]
    saved: tuple | None = None  # (a, g) of a ghost layer


class BookKeeping:
    """One-backward per-example clipping for ``model``'s trainable parameters (see module docstring).

    Use::

        bk = BookKeeping(model, noise_multiplicity=K, max_grad_norm=C)
        with bk.recording():
            loss = per_example_loss(model, ...) # [B]; the model sees B·K rows, sample-major
        norms = bk.clipped_backward(loss)       # p.grad = Σ_b c_b ∇ℓ_b ; returns ‖∇ℓ_b‖
    """

    def __init__(self, model: nn.Module, *, noise_multiplicity: int = 1, max_grad_norm: float):
        self.model, self.K, self.C = model, noise_multiplicity, max_grad_norm
        refuse_row_mixing(model)
        self.layers: list[_Layer] = []
        owner: dict[int, str] = {}
        for name, module in model.named_modules():
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            if not isinstance(module, SUPPORTED) or any(n not in ("weight", "bias") for n, _ in params):
                kind = type(module).__name__
                raise ValueError(f"book-keeping clipping does not support trainable {kind} '{name}' "
                                 f"(supported: {', '.join(t.__name__ for t in SUPPORTED)}); use grad_sample_mode=hooks")
            if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
                raise ValueError(f"book-keeping clipping does not support Embedding '{name}' with max_norm, scale_grad_by_freq or sparse")
            if getattr(module, "padding_mode", "zeros") != "zeros" or isinstance(getattr(module, "padding", 0), str):
                raise ValueError(f"book-keeping clipping supports convolutions with explicit zero padding only ('{name}')")
            if any(p.dtype not in (torch.float32, torch.float64) for _, p in params):
                raise ValueError(f"book-keeping clipping needs float32 or float64 parameters ('{name}'): norms in half precision are too coarse for clipping")
            for n, p in params:
                if id(p) in owner:
                    raise ValueError(f"parameter shared by '{owner[id(p)]}' and '{name}': not supported by book-keeping clipping")
                owner[id(p)] = name
            self.layers.append(_Layer(name, module, params))
        self.params = [p for layer in self.layers for _, p in layer.params]
        self._recording = False
        self._roots: list[Tensor] = []
        self._sq: Tensor | None = None
        self._batch: int | None = None
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers]

    # -- forward: remember (a, out) and where the backward must reach ---------------------------
    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            if not (self._recording and torch.is_grad_enabled()):
                return
            layer.calls += 1
            if layer.calls > 1:
                raise RuntimeError(f"'{layer.name}' was called twice in one forward: book-keeping clipping "
                                   "needs each layer once per forward (use grad_sample_mode=hooks)")
            a = inputs[0]
            a_saved, version = a.detach(), a._version
            if not a.requires_grad:
                self._roots.append(out)
            out.register_hook(lambda g, layer=layer, a=a_saved, version=version: self._backward(layer, a, version, g))
        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the forward pass whose loss :meth:`clipped_backward` will clip."""
        for layer in self.layers:
            layer.calls = layer.processed = 0
            layer.direct, layer.saved = {}, None
        self._roots, self._sq, self._batch = [], None, None
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    # -- backward: per-layer norms as each output gradient arrives -------------------------------
    def _backward(self, layer: _Layer, a: Tensor, version: int, g: Tensor) -> None:
        if a._version != version:
            raise RuntimeError(f"the input of '{layer.name}' was modified in place after the forward")
        B = self._batch
        if a.shape[0] != B * self.K:
            raise RuntimeError(f"'{layer.name}' saw {a.shape[0]} rows, expected B·K = {B}·{self.K}")
        sq = _LAYER_RULES[type(layer.module)](self, layer, a, g, B)
        self._sq = sq.double() if self._sq is None else self._sq + sq.double()
        layer.processed += 1

    def clipped_backward(self, loss: Tensor) -> Tensor:
        """Backward of ``loss`` (one value per example, [B]; the model saw B·K rows) that leaves the clipped sum in each ``p.grad``.

        Returns the per-example gradient norms ‖∇ℓ_b‖ (before clipping), shape [B].
        """
        if loss.ndim != 1:
            raise ValueError(f"expected one loss per example [B], got shape {tuple(loss.shape)}")
        frozen = [layer.name for layer in self.layers for _, p in layer.params if not p.requires_grad]
        if frozen:  # its clipped sum would be written, and an optimizer might apply it without noise
            raise RuntimeError(f"parameters of {frozen[:3]} were frozen after the engine was built: build a new engine")
        self._batch = loss.shape[0]
        if not self._roots:
            raise RuntimeError("no recorded forward: compute the loss inside `with bk.recording():`")
        torch.autograd.grad(loss.sum(), self._roots, allow_unused=True)
        missing = [layer.name for layer in self.layers if layer.calls != layer.processed]
        if missing:  # a layer whose gradient never arrived would be missing from every ‖g_b‖
            raise RuntimeError(f"output gradients of {missing[:3]} never arrived: cannot bound the per-example norm")
        norms = (self._sq if self._sq is not None else torch.zeros(self._batch, dtype=torch.float64)).sqrt()
        c = (self.C / (norms.float() + 1e-6)).clamp(max=1.0)  # Opacus' clip factor
        for layer in self.layers:
            grads = _clipped_sum(layer, c) if layer.calls else {n: torch.zeros_like(p) for n, p in layer.params}
            for n, p in layer.params:
                p.grad = grads[n].to(p.dtype).reshape(p.shape)
            layer.direct, layer.saved = {}, None
        self._roots = []
        return norms.float()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# -- per-layer rules: squared per-example norm, and what the clipped sum will need -----------------

def refuse_row_mixing(model: nn.Module) -> None:
    """Per-example clipping assumes example b's loss depends on example b alone: refuse layers that mix rows.

    BatchNorm in training mode normalises with batch statistics (and its running statistics,
    saved with the model, are an unnoised function of the private batch), trainable or not.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats):
            raise ValueError(f"'{name}' ({type(m).__name__}) mixes examples or keeps unnoised running statistics: "
                             "not allowed in DP-SGD (use GroupNorm)")


def _rows(t: Tensor, B: int) -> Tensor:
    """[B·K, ...] -> [B, K, ...]: example b's K rows."""
    return t.reshape(B, -1, *t.shape[1:])


def _sq_norms(per_example: Tensor) -> Tensor:
    """‖x_b‖² of each example's slice, without materialising the squares."""
    return torch.linalg.vector_norm(per_example.reshape(per_example.shape[0], -1), dim=1).square()


def _use_ghost(positions: int, p: int, d: int) -> bool:
    """Mixed ghost rule (Bu et al. 2022), by arithmetic: per example the two Grams cost T²·(d + p)
    multiply-adds, the per-example gradient T·p·d; ghost also needs one more weighted gradient for
    the clipped sum, so it must win by a factor of 2."""
    return 2 * positions * (d + p) < p * d


def _has(layer: _Layer, name: str) -> bool:
    return any(n == name for n, _ in layer.params)


def _linear(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    A = a.reshape(B, -1, a.shape[-1])  # [B, K·T, d]
    G = g.reshape(B, -1, g.shape[-1])  # [B, K·T, p]
    sq = torch.zeros(B, dtype=g.dtype, device=g.device)
    if _has(layer, "weight"):
        if _use_ghost(A.shape[1], G.shape[2], A.shape[2]):
            sq = sq + (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))
            layer.saved = (a, g)
        else:
            W = torch.bmm(G.transpose(1, 2), A)  # ∇W_b = G_bᵀ A_b, [B, p, d]
            sq = sq + _sq_norms(W)
            layer.direct["weight"] = W
    if _has(layer, "bias"):
        layer.direct["bias"] = G.sum(1)  # ∇bias_b = 1ᵀ G_b
        sq = sq + _sq_norms(layer.direct["bias"])
    return sq


def _conv(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    m = layer.module
    dims = a.ndim - 2
    groups, p, T = m.groups, m.out_channels, g[0, 0].numel()
    d = m.in_channels // groups * m.weight[0, 0].numel()
    sq = torch.zeros(B, dtype=g.dtype, device=g.device)
    if _has(layer, "weight"):
        if _use_ghost(a.shape[0] // B * T, p // groups, d):
            G = g.reshape(B, -1, groups, p // groups, T)  # [B, K, γ, p/γ, T]
            U = _unfold(m, a, dims).reshape(B, -1, groups, d, T)  # [B, K, γ, d, T]
            Ug = U.permute(0, 2, 1, 4, 3).reshape(B * groups, -1, d)  # [B·γ, K·T, d]
            Gg = G.permute(0, 2, 1, 4, 3).reshape(B * groups, -1, p // groups)
            sq = sq + (torch.bmm(Ug, Ug.transpose(1, 2)) * torch.bmm(Gg, Gg.transpose(1, 2))).sum((1, 2)).reshape(B, groups).sum(1)
            layer.saved = (a, g)
        else:
            W = _per_example_conv_weight(m, a, g, B, dims)  # [B, *weight.shape]
            sq = sq + _sq_norms(W)
            layer.direct["weight"] = W
    if _has(layer, "bias"):
        layer.direct["bias"] = _rows(g.sum(tuple(range(2, g.ndim))), B).sum(1)  # Σ over draws and positions
        sq = sq + _sq_norms(layer.direct["bias"])
    return sq


def _unfold(m: nn.Module, a: Tensor, dims: int) -> Tensor:
    """im2col [R, C_in·k…, T] of a zero-padded convolution's input."""
    if dims == 2:
        return F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    if dims == 1:  # as a 2-D convolution of height 1
        return F.unfold(a.unsqueeze(2), (1, m.kernel_size[0]), dilation=(1, m.dilation[0]),
                        padding=(0, m.padding[0]), stride=(1, m.stride[0]))
    k, s, pd, dl = m.kernel_size, m.stride, m.padding, m.dilation  # 3-D: pad, then strided windows
    x = F.pad(a, [q for pp in reversed(pd) for q in (pp, pp)])
    for i in range(3):
        x = x.unfold(2 + i, dl[i] * (k[i] - 1) + 1, s[i])[..., ::dl[i]]
    # x: [R, C, To1, To2, To3, k1, k2, k3] -> [R, C·k1·k2·k3, T]
    R, C = x.shape[:2]
    return x.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(R, C * k[0] * k[1] * k[2], -1)


def _per_example_conv_weight(m: nn.Module, a: Tensor, g: Tensor, B: int, dims: int) -> Tensor:
    """∇W_b = Σ_{k,t} g_{b,k,t} ⊗ patch_{b,k,t}: the weight gradient of each example's K rows.

    Two exact kernels, chosen by the layer's shape (measured on CPU, docs/benchmarks.md):
    autograd's own weight-gradient kernel with the examples folded into the groups (fast for
    narrow layers), or, for wide stride-1 "same" 2-D convolutions, one batched matrix product per
    kernel tap over shifted views of the padded input (no im2col buffer).
    """
    if dims == 2 and _shifted_taps_apply(m) and m.in_channels // m.groups > 32:
        return _per_example_conv2d_shifted(m, a, g, B)
    K = a.shape[0] // B
    w = m.weight
    a_k = a.reshape(B, K, *a.shape[1:]).transpose(0, 1).reshape(K, B * a.shape[1], *a.shape[2:])
    g_k = g.reshape(B, K, *g.shape[1:]).transpose(0, 1).reshape(K, B * g.shape[1], *g.shape[2:])
    W = _CONV_WEIGHT_GRAD[dims](a_k, (B * w.shape[0], *w.shape[1:]), g_k, m.stride, m.padding, m.dilation, B * m.groups)
    return W.reshape(B, *w.shape)


def _shifted_taps_apply(m: nn.Module) -> bool:
    kh, kw = m.kernel_size
    return (m.groups == 1 and m.stride == (1, 1) and m.dilation == (1, 1) and kh % 2 == 1 and kw % 2 == 1
            and m.padding == (kh // 2, kw // 2))


def _per_example_conv2d_shifted(m: nn.Module, a: Tensor, g: Tensor, B: int) -> Tensor:
    """Per-example weight gradient of a stride-1 "same" conv as one bmm per tap.

    With the input zero-padded and flattened channels-last to [R, (H+2P+1)·(W+2Q), C_in], and the
    output gradient padded to width W+2Q, tap (i, j) of example b is the product of g_b
    [C_out, H·(W+2Q)] with the contiguous window starting at i·(W+2Q) + j: the padding columns
    of g are zero, so they add nothing. Rows of one example (its K draws) are consecutive
    windows' batch entries and are summed by viewing [B, K·T', ·].
    """
    kh, kw = m.kernel_size
    P, Q = kh // 2, kw // 2
    R, C_in, H, W = a.shape
    K, Wp = R // B, W + 2 * Q
    rows = H * Wp
    A = F.pad(a, (Q, Q, P, P + 1)).permute(0, 2, 3, 1).reshape(R, (H + 2 * P + 1) * Wp, C_in)
    Gp = F.pad(g, (0, 2 * Q)).reshape(B, K, m.out_channels, rows).transpose(1, 2).reshape(B, m.out_channels, K * rows)
    out = torch.empty(kh * kw, B, m.out_channels, C_in, dtype=a.dtype, device=a.device)
    for i in range(kh):
        for j in range(kw):
            off = i * Wp + j
            window = A[:, off:off + rows, :].reshape(B, K * rows, C_in)  # a copy only when K > 1
            torch.bmm(Gp, window, out=out[i * kw + j])
    return out.permute(1, 2, 3, 0).reshape(B, m.out_channels, C_in, kh, kw)


def _group_norm(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    """GroupNorm: ∇γ_b[c] = Σ_{k,t} x̂·g and ∇β_b[c] = Σ_{k,t} g, with x̂ = (a − μ)·rstd per row and group.

    Σ_t x̂·g = rstd·(Σ_t a·g − μ·Σ_t g): no normalised copy of the input (and never (y − β)/γ,
    as γ may be ~0).
    """
    m = layer.module
    R, C = a.shape[:2]
    a3, g3 = a.reshape(R, C, -1), g.reshape(R, C, -1)  # [R, C, positions]; no positions is one position
    g_sum = g3.sum(2)  # [R, C]
    # μ and rstd per (row, group) from the same kernel the forward used (not a second, slower pass)
    _, mean, rstd = torch.native_group_norm(a.contiguous(), None, None, R, C, a3.shape[2], m.num_groups, m.eps)
    rstd = rstd.repeat_interleave(C // m.num_groups, dim=1)
    mean = mean.repeat_interleave(C // m.num_groups, dim=1)
    return _affine_grads(layer, lambda: rstd * (torch.einsum("rct,rct->rc", a3, g3) - mean * g_sum), g_sum, B)


def _layer_norm(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    """LayerNorm: the same sums over every position of the row (the affine is over the last dims)."""
    m = layer.module
    x_hat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
    shape = (a.shape[0], -1, *m.normalized_shape)  # [R, positions, *normalized_shape]
    return _affine_grads(layer, lambda: (x_hat * g).reshape(shape).sum(1), g.reshape(shape).sum(1), B)


def _affine_grads(layer: _Layer, weight_rows, bias_rows: Tensor, B: int) -> Tensor:
    """Per-example (Σ over the K rows) weight and bias gradients of a normalisation's affine."""
    sq = torch.zeros(B, dtype=bias_rows.dtype, device=bias_rows.device)
    if _has(layer, "weight"):
        layer.direct["weight"] = _rows(weight_rows(), B).sum(1)
        sq = sq + _sq_norms(layer.direct["weight"])
    if _has(layer, "bias"):
        layer.direct["bias"] = _rows(bias_rows, B).sum(1)
        sq = sq + _sq_norms(layer.direct["bias"])
    return sq


def _embedding(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    idx = a.reshape(B, -1)  # [B, K·L] the rows' indices
    G = g.reshape(B, idx.shape[1], -1)  # [B, K·L, e]
    same = (idx[:, :, None] == idx[:, None, :]).to(G.dtype)
    if layer.module.padding_idx is not None:  # rows at padding_idx get no gradient
        keep = (idx != layer.module.padding_idx).to(G.dtype)
        same = same * keep[:, :, None] * keep[:, None, :]
    layer.saved = (a, g)
    return (same * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))  # ‖∇E_b‖² = Σ 1[i=j]⟨g_i, g_j⟩


_LAYER_RULES = {
    nn.Linear: _linear,
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}


def _clipped_sum(layer: _Layer, c: Tensor) -> dict[str, Tensor]:
    """Σ_b c_b ∇_b for each of the layer's parameters."""
    m, out = layer.module, {}
    for name, per_example in layer.direct.items():
        out[name] = torch.tensordot(c.to(per_example.dtype), per_example, dims=1)
    if layer.saved is not None:
        a, g = layer.saved
        c_rows = c.repeat_interleave(a.shape[0] // c.shape[0]).to(g.dtype)
        g_c = g * c_rows.view(-1, *[1] * (g.ndim - 1))  # c-scaled output gradients: ONE weighted gradient
        if isinstance(m, nn.Linear):
            out["weight"] = g_c.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        elif isinstance(m, nn.Embedding):
            grad = torch.zeros_like(m.weight).index_add_(0, a.reshape(-1), g_c.reshape(-1, g.shape[-1]))
            if m.padding_idx is not None:
                grad[m.padding_idx] = 0
            out["weight"] = grad
        else:  # convolution
            dims = a.ndim - 2
            out["weight"] = _CONV_WEIGHT_GRAD[dims](a, m.weight.shape, g_c, m.stride, m.padding, m.dilation, m.groups)
    return out
