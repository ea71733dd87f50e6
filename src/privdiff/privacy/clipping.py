"""Per-example clipping in one backward pass: book-keeping with mixed ghost norms.

The clipped sum Σ_b min(1, C/‖g_b‖)·g_b needs every example's gradient norm ‖g_b‖ before it
can weight the examples. Opacus materialises per-row gradients (hooks) or re-runs the backward
(ghost clipping). Book-keeping (BK; Bu, Wang, Zha & Karypis, ICML 2023) needs neither: for a
layer out = f(a; W), the gradient of example b is a function of its input activations a_b and
output gradients g_b = ∂L/∂out_b alone, so one backward pass that yields (a, g) per layer gives

1. the per-example squared norm of every layer, either *ghost* — ⟨a_b a_bᵀ, g_b g_bᵀ⟩ over the
   layer's positions, no gradient formed (Li et al. 2021) — or *direct* — the per-example
   gradient itself, whichever is cheaper for the layer's shape (mixed ghost clipping, Bu et al.
   2022). Direct convolution gradients come from the fastest of several exact kernels for the
   layer's shape, timed once (:func:`_per_example_conv_weight`); the small per-example
   gradients (biases, normalisation affines) of all layers are normed and summed as one matrix;
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
Float32 Grams can cancel (positions whose gradients nearly cancel): ghost norms are formed in
float64 with a rigorous rounding bound added, and a cancelling example's norm and update come
from its own float64 per-example gradient (see ``_ghost_sq``); under autocast the engine upcasts
the recorded (a, g) exactly and never computes in half precision. No layer waits for the host: a clipped
backward reads ONE small tensor back, after all of its work is queued (which norms are not finite,
which examples' ghost Grams may cancel), since both decide what the update may be. Subclasses of the supported
layers use their base's rule if their forward computes the same (checked once). The first step
with two or more examples probes that every layer's first axis is the example axis
(:func:`check_example_axis`: a sequence-first layer of length B·K is refused, not clipped per
position). Contracts the caller keeps: rows are sample-major (``denoising_loss`` builds them so), and a
weight is used only through its module's forward — a weight read directly (``F.linear(x,
m.weight)``) is invisible to the hooks, so that path is missing from both the norm and the
update (private, but not trained). privdiff's UNets satisfy both (tests against one example at a
time).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]  # trainable direct parameters ("weight", "bias")
    rule: object = None  # the layer kind's rule (_LAYER_RULES, found through the class's MRO)
    checked: bool = False  # a subclass's forward was compared with its supported base's (once)
    calls: int = 0  # forward calls recorded in the current chunk
    processed: int = 0  # output gradients processed in the current chunk
    # what the clipped sum needs once the clip factors are known
    direct: dict[str, Tensor] = field(default_factory=dict)  # per-example gradients [B, *shape]
    small: dict[str, Tensor] = field(
        default_factory=dict
    )  # per-example biases and affines [B, n], normed and summed together
    saved: tuple | None = None  # (a, g) of a ghost layer; (index slots, row sums) of an Embedding
    exact: dict = field(
        default_factory=dict
    )  # ghost layer: example b -> its float64 per-example gradient, where Grams cancel
    # ghost layer, until the step's one host synchronisation: (examples whose Grams may cancel [B] bool,
    # S_b = Σ_t ‖a_t‖‖g_t‖ [B], positions n, direct(b) -> example b's gradient); see _ghost_sq
    cancel: tuple | None = None
    stats: tuple | None = None  # GroupNorm: the forward's own (μ, rstd), when autograd kept them


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
            rule = layer_rule(module)
            if rule is None or any(n not in ("weight", "bias") for n, _ in params):
                kind = type(module).__name__
                raise ValueError(
                    f"book-keeping clipping does not support trainable {kind} '{name}' "
                    f"(supported: {', '.join(t.__name__ for t in SUPPORTED)}); use grad_sample_mode=hooks"
                )
            if isinstance(module, nn.Embedding) and (
                module.max_norm is not None or module.scale_grad_by_freq or module.sparse
            ):
                raise ValueError(
                    f"book-keeping clipping does not support Embedding '{name}' with max_norm, scale_grad_by_freq or sparse"
                )
            if getattr(module, "padding_mode", "zeros") != "zeros" or isinstance(getattr(module, "padding", 0), str):
                raise ValueError(
                    f"book-keeping clipping supports convolutions with explicit zero padding only ('{name}')"
                )
            if any(p.dtype not in (torch.float32, torch.float64) for _, p in params):
                raise ValueError(
                    f"book-keeping clipping needs float32 or float64 parameters ('{name}'): norms in half precision are too coarse for clipping"
                )
            for n, p in params:
                if id(p) in owner:
                    raise ValueError(
                        f"parameter shared by '{owner[id(p)]}' and '{name}': not supported by book-keeping clipping"
                    )
                owner[id(p)] = name
            self.layers.append(_Layer(name, module, params, rule))
        self.params = [p for layer in self.layers for _, p in layer.params]
        self._recording = self._probing = False
        self._axis_checked = False  # the one-time example-axis probe (check_example_axis) has passed
        self._outputs: dict[str, Tensor] = {}  # every layer's output, kept for that probe only
        self._roots: list[Tensor] = []
        self._sq: list[tuple[_Layer, Tensor]] = []  # each layer's share of ‖g_b‖², in backward order
        self._batch: int | None = None
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers]

    # -- forward: remember (a, out) and where the backward must reach ---------------------------
    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            if not (self._recording and torch.is_grad_enabled()):
                return
            layer.calls += 1
            if layer.calls > 1:
                raise RuntimeError(
                    f"'{layer.name}' was called twice in one forward: book-keeping clipping "
                    "needs each layer once per forward (use grad_sample_mode=hooks)"
                )
            a = inputs[0]
            if not layer.checked:
                _check_subclass_forward(layer, a, out)
                layer.checked = True
            a_saved, version = _as_computed(module, a.detach()), a._version
            if isinstance(module, nn.GroupNorm):
                layer.stats = _forward_group_norm_stats(out, a)
            if not a.requires_grad:
                self._roots.append(out)
            if not self._axis_checked:
                self._outputs[layer.name] = out
            out.register_hook(lambda g, layer=layer, a=a_saved, version=version: self._backward(layer, a, version, g))

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the forward pass whose loss :meth:`clipped_backward` will clip."""
        for layer in self.layers:
            layer.calls = layer.processed = 0
            layer.direct, layer.small, layer.saved, layer.stats, layer.exact, layer.cancel = (
                {},
                {},
                None,
                None,
                {},
                None,
            )
        self._roots, self._sq, self._batch, self._outputs = [], [], None, {}
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    # -- backward: per-layer norms as each output gradient arrives -------------------------------
    def _backward(self, layer: _Layer, a: Tensor, version: int, g: Tensor) -> None:
        if self._probing:  # the example-axis probe's backward: nothing to record
            return
        if a._version != version:
            raise RuntimeError(f"the input of '{layer.name}' was modified in place after the forward")
        B = self._batch
        if a.shape[0] != B * self.K:
            raise RuntimeError(f"'{layer.name}' saw {a.shape[0]} rows, expected B·K = {B}·{self.K}")
        a, g = _exact_inputs(layer, a, g)
        with torch.autocast(a.device.type, enabled=False):  # the engine's own arithmetic never runs in half precision
            sq = layer.rule(self, layer, a, g, B)
        if sq is not None:  # summed once, in float64, when the backward is over
            self._sq.append((layer, sq))
        layer.processed += 1

    def clipped_backward(self, loss: Tensor) -> Tensor:
        """Backward of ``loss`` (one value per example, [B]; the model saw B·K rows) that leaves the clipped sum in each ``p.grad``.

        Returns the per-example gradient norms ‖∇ℓ_b‖ (before clipping), shape [B].

        The first call with B ≥ 2 also checks the model once (:func:`check_example_axis`): the
        gradient of half of the examples' losses must reach no row of the other half at any
        layer, so that the first axis is the example axis everywhere.
        """
        if loss.ndim != 1:
            raise ValueError(f"expected one loss per example [B], got shape {tuple(loss.shape)}")
        frozen = [layer.name for layer in self.layers for _, p in layer.params if not p.requires_grad]
        if frozen:  # its clipped sum would be written, and an optimizer might apply it without noise
            raise RuntimeError(f"parameters of {frozen[:3]} were frozen after the engine was built: build a new engine")
        self._batch = B = loss.shape[0]
        if not self._roots:
            raise RuntimeError("no recorded forward: compute the loss inside `with bk.recording():`")
        if not self._axis_checked and B >= 2:  # once per engine
            self._probing = True
            try:
                check_example_axis(loss, self._outputs, K=self.K)
            finally:
                self._probing = False
            self._axis_checked = True
        self._outputs = {}
        torch.autograd.grad(loss.sum(), self._roots, allow_unused=True)
        missing = [layer.name for layer in self.layers if layer.calls != layer.processed]
        if missing:  # a layer whose gradient never arrived would be missing from every ‖g_b‖
            raise RuntimeError(f"output gradients of {missing[:3]} never arrived: cannot bound the per-example norm")
        # the small per-example gradients (biases, normalisation affines) of every layer as one [B, n] matrix
        small = [(layer, name, x) for layer in self.layers for name, x in layer.small.items()]
        S = torch.cat([x for _, _, x in small], 1) if small else None
        small_sq = None if S is None else torch.linalg.vector_norm(S.double(), dim=1).square()
        norms, c, sums = self._clip(B, loss.device, small, S, small_sq)
        # The step's one host synchronisation in the clipping, after all of its work was queued: whether any
        # norm is not finite, and which examples' ghost Grams may cancel (both must be known before p.grad is set).
        ghosts = [layer for layer, _ in self._sq if layer.cancel is not None]
        flags = torch.stack([~torch.isfinite(norms), *[layer.cancel[0] for layer in ghosts]]).cpu()
        if bool(flags[0].any()):  # no clip factor can bound an infinite or undefined gradient
            bad = torch.nonzero(flags[0]).flatten().tolist()
            raise FloatingPointError(
                f"non-finite per-example gradient norm for example(s) {bad[:5]} of this batch: "
                "the step cannot be clipped (lower the learning rate, or check the inputs)"
            )
        if bool(flags[1:].any()):  # rare: those examples' norms and updates come from their exact gradients
            for layer, row in zip(ghosts, flags[1:]):
                _exact_cancelling(layer, self._sq, torch.nonzero(row).flatten().tolist())
            norms, c, sums = self._clip(B, loss.device, small, S, small_sq)
        for layer in self.layers:
            for n, p in layer.params:
                p.grad = sums[id(p)].to(p.dtype).reshape(p.shape)
            layer.direct, layer.small, layer.saved, layer.stats, layer.exact, layer.cancel = (
                {},
                {},
                None,
                None,
                {},
                None,
            )
        self._roots, self._sq = [], []
        return norms.float()

    def _clip(
        self, B: int, device: torch.device, small: list, S: Tensor | None, small_sq: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """‖g_b‖ from every layer's share (stacked, summed once in float64), the clip factors, and the clipped sums."""
        parts = [sq for _, sq in self._sq] + ([] if small_sq is None else [small_sq])
        sq = (
            torch.stack(parts).sum(0, dtype=torch.float64)
            if parts
            else torch.zeros(B, dtype=torch.float64, device=device)
        )
        norms = sq.sqrt()
        c = (self.C / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clip factor (float64; each use casts it once)
        return norms, c, self._weighted_sums(c, small, S)

    def _weighted_sums(self, c: Tensor, small: list, S: Tensor | None) -> dict[int, Tensor]:
        """Σ_b c_b ∇_b for every trainable parameter (by id), from what the backward recorded."""
        out: dict[int, Tensor] = {}
        if S is not None:
            for (layer, name, _), s in zip(small, (c.to(S.dtype) @ S).split([x.shape[1] for _, _, x in small])):
                out[id(dict(layer.params)[name])] = s
        with torch.autocast(c.device.type, enabled=False), _full_precision():
            for layer in self.layers:
                grads = _clipped_sum(layer, c) if layer.calls else {n: torch.zeros_like(p) for n, p in layer.params}
                for n, p in layer.params:
                    out.setdefault(id(p), grads.get(n))
        return out

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
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
            isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats
        ):
            raise ValueError(
                f"'{name}' ({type(m).__name__}) mixes examples or keeps unnoised running statistics: "
                "not allowed in DP-SGD (use GroupNorm)"
            )


def check_example_axis(loss: Tensor, outputs: dict[str, Tensor], *, K: int) -> None:
    """Refuse a model whose layers' first axis is not the example axis (a one-time structural probe).

    Per-example clipping reads rows b·K … b·K+K−1 of every layer's input and output as example b's.
    A shape cannot prove that: a sequence-first layer ([T, B, d], e.g. Opacus'
    ``DPMultiheadAttention(batch_first=False)``) whose length T happens to equal B·K passes every
    shape check and is then clipped per *position*, one example spread over all rows (5.3 C seen).
    So the gradient of Σ_b m_b ℓ_b, with m_b = 1 for even b and 0 for odd b, is taken with respect
    to every recorded layer output: where rows are examples, the rows of the odd examples get
    exactly zero (their loss has weight 0 and no other example reaches them); any non-zero value
    there means the layer mixes examples across its first axis, and the model is refused.

    Args:
        loss: one loss per example [B], B ≥ 2, whose graph is kept (``retain_graph``).
        outputs: each layer's output from the same forward, by module path.
        K: rows per example (noise multiplicity).
    """
    B = loss.shape[0]
    mask = (torch.arange(B, device=loss.device) % 2 == 0).to(loss.dtype)
    names = [n for n, out in outputs.items() if out.requires_grad]
    grads = torch.autograd.grad((loss * mask).sum(), [outputs[n] for n in names], retain_graph=True, allow_unused=True)
    for name, g in zip(names, grads):
        if g is None or g.shape[0] != B * K:  # no path to the loss, or a row count the engine refuses by itself
            continue
        if bool((g.reshape(B, -1)[1::2].abs() > 0).any()):
            raise ValueError(
                f"'{name}': the loss of one example reaches rows of another at this layer: its input's first "
                "axis is not the example axis (a sequence-first layer, or one that mixes examples), so "
                "per-example clipping would clip the wrong rows; make the layer batch-first (batch_first=True)"
            )


@contextlib.contextmanager
def layer_outputs(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Collect the output of every module that owns trainable parameters, by module path, for :func:`check_example_axis`."""
    outputs: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            handles.append(
                module.register_forward_hook(
                    lambda m, i, out, name=name: outputs.__setitem__(name, out) if isinstance(out, Tensor) else None
                )
            )
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _check_subclass_forward(layer: _Layer, a: Tensor, out: Tensor) -> None:
    """A subclass of a supported layer uses its base's per-example rule, which is right only if it
    computes what the base computes (``GroupNorm32`` normalising in float32 does; a subclass that
    rescales its input would get wrong per-example gradients). Checked once, on the first forward."""
    base = next(cls for cls in type(layer.module).__mro__ if cls in _LAYER_RULES)
    if type(layer.module) is base:
        return
    try:
        with torch.no_grad():
            ref = base.forward(layer.module, a)
    except Exception:  # the subclass's forward takes or returns something else: not the base's computation
        ref = None
    ok = ref is not None and isinstance(out, Tensor) and out.shape == ref.shape
    if ok:
        half = torch.float16 in (out.dtype, ref.dtype) or torch.bfloat16 in (out.dtype, ref.dtype)
        tol = 1e-2 if half else 1e-4
        ref, got = ref.detach().double(), out.detach().double()
        ok = bool(((got - ref).abs() <= tol * (ref.abs() + ref.abs().max())).all())
    if not ok:
        raise ValueError(
            f"'{layer.name}' ({type(layer.module).__name__}, a subclass of {base.__name__}) computes something "
            f"other than {base.__name__}: its per-example gradients cannot be derived by {base.__name__}'s "
            "rule (use grad_sample_mode=hooks)"
        )


def _rows(t: Tensor, B: int) -> Tensor:
    """[B·K, ...] -> [B, K, ...]: example b's K rows."""
    return t.reshape(B, -1, *t.shape[1:])


def _batch_major(per_example: Tensor) -> tuple[Tensor, list[int]]:
    """A [B, ...] tensor in any dense layout as a contiguous [pre, B, post] view (a copy only if gapped), and the permutation used."""
    order = sorted(range(per_example.ndim), key=lambda i: (-per_example.stride(i), i))
    x = per_example.permute(order)
    if not x.is_contiguous():  # overlapping or gapped storage: a copy
        x = x.contiguous()
    j = order.index(0)
    return x.reshape(math.prod(x.shape[:j]), x.shape[j], math.prod(x.shape[j + 1 :])), order


def _sq_norms(per_example: Tensor) -> Tensor:
    """‖x_b‖² of each example's slice [B, ...], read in place in whatever memory layout it has."""
    if per_example.is_contiguous():
        return torch.linalg.vector_norm(per_example.view(per_example.shape[0], -1), dim=1).square()
    x, _ = _batch_major(per_example)
    return torch.linalg.vector_norm(x, dim=2).square().sum(0)  # contiguous inner reductions


def _weighted_sum(c: Tensor, per_example: Tensor) -> Tensor:
    """Σ_b c_b·x_b over a [B, ...] tensor in any dense memory layout, read in place.

    In the order of its strides the tensor is [pre, B, post]; one matrix-vector product per
    ``pre`` sums over B there, and the result is permuted back to one example's shape.
    """
    x, order = _batch_major(per_example)
    s = torch.matmul(c.to(x.dtype), x)  # [pre, post]
    dims = [per_example.shape[o] for o in order if o != 0]  # the result's dims, in storage order
    rest = [o - 1 for o in order if o != 0]  # ... as dims of one example's slice
    return s.reshape(dims).permute([rest.index(i) for i in range(len(rest))])


def _use_ghost(positions: int, p: int, d: int) -> bool:
    """Mixed ghost rule (Bu et al. 2022), by arithmetic: per example the two Grams cost T²·(d + p)
    multiply-adds, the per-example gradient T·p·d; ghost also needs one more weighted gradient for
    the clipped sum, and its Grams are formed in float64 (about twice float32's cost), so it must
    win by a factor of 4."""
    return 4 * positions * (d + p) < p * d


# -- ghost norms that never under-estimate ---------------------------------------------------------
#
# ⟨A Aᵀ, G Gᵀ⟩ = ‖GᵀA‖²_F holds exactly, but in floating point it is a sum of T² terms of either sign
# whose total can be far smaller than its terms: positions whose gradients cancel (g_t ≈ −g_t' with
# a_t ≈ a_t') leave a tiny true norm under a rounding error of order u·(Σ_t ‖a_t‖‖g_t‖)². In float32
# that under-estimated norms by 27 % (and went negative: NaN); an under-estimated norm lets the
# example contribute more than C. So the Grams are formed in float64 from the (exactly upcast)
# recorded a and g, and each example's squared norm is replaced by a rigorous upper bound:
#
#     ‖GᵀA‖² ≤ max(s̃, 0) + (γ_{T²} + γ_d + γ_p + 3u)·1.1·S²,   S = Σ_t ‖a_t‖‖g_t‖,
#
# with γ_n = n·u/(1 − n·u) the bound of an n-term float64 dot product (Higham, Accuracy and
# Stability of Numerical Algorithms, §3.1), since each Gram entry is off by at most γ_d‖a_i‖‖a_j‖
# (resp. γ_p‖g_i‖‖g_j‖) and Σ_ij ‖a_i‖‖a_j‖‖g_i‖‖g_j‖ = S² (the factor 1.1 covers S's own rounding).
# On ordinary inputs the term is ~1e-9 of the norm. Where it is not small (cancellation: bound
# > 1e-4 of s̃), the example's norm is recomputed from its own per-example gradient in float64,
# whose error is at most γ_n·S in Frobenius norm (n terms per entry), and the smaller of the two
# bounds is used. Either way min(1, C/‖g_b‖) never lets a contribution exceed C.

_U64 = 2.0**-53  # unit round-off of float64
_CANCELLING = 1e-4  # bound / s̃ above which an example's ghost norm is recomputed directly


def _gamma(n: int) -> float:
    """γ_n = n·u/(1 − n·u): the relative error bound of an n-term float64 sum of products."""
    return n * _U64 / (1 - n * _U64)


def _ghost_sq(layer: _Layer, A: Tensor, G: Tensor, B: int, direct) -> Tensor:
    """Upper bounds on ‖∇W_b‖²_F, [B] float64, from Grams of A [B·γ, n, d] and G [B·γ, n, p] (γ groups per example).

    ``direct(b)`` returns example b's per-example gradient (the weight's shape), used only for
    examples whose Grams cancel (see the note above): which ones is left on the device, in
    ``layer.cancel``, so that no layer waits for the host; after the backward,
    :meth:`BookKeeping.clipped_backward` reads every layer's at once and :func:`_exact_cancelling`
    replaces those examples' bounds by their exact gradients' (kept in ``layer.exact``, they enter
    the clipped sum as they are, instead of through the fused weighted gradient, whose float32
    rounding for such an example is of the order of its cancelling terms).

    The other examples enter through that fused weighted gradient, one matrix product over all
    B·n rows in the recorded dtype: its rounding is at most γ'_{B·n}·S_b in example b's share
    (γ' in that dtype's unit round-off, full precision forced: :func:`_full_precision`), so that
    much is added to their norm bound and c_b·(their share as computed) stays ≤ C.
    """
    u_fused = torch.finfo(A.dtype).eps / 2
    n_fused = (
        A.shape[0] * A.shape[1]
    )  # the fused product's reduction length, B·K·T (times γ for grouped convs: an over-count)
    A, G = A.double(), G.double()
    n, d, p = A.shape[1], A.shape[2], G.shape[2]
    sq = (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum((1, 2)).reshape(B, -1).sum(1)
    S = (torch.linalg.vector_norm(A, dim=2) * torch.linalg.vector_norm(G, dim=2)).sum(1).reshape(B, -1).sum(1)
    bound = sq.clamp(min=0) + (_gamma(n * n) + _gamma(d) + _gamma(p) + 3 * _U64) * 1.1 * S.square()
    layer.cancel = (bound - sq.clamp(min=0) > _CANCELLING * sq.clamp(min=0), S, n, direct)
    # the fused float32 (or float64) weighted gradient's rounding in an unflagged example's share
    gamma_fused = n_fused * u_fused / (1 - n_fused * u_fused)
    return (bound.sqrt() + gamma_fused * 1.1 * S).square()


def _exact_cancelling(layer: _Layer, shares: list[tuple[_Layer, Tensor]], flagged: list[int]) -> None:
    """Examples ``flagged`` of a ghost layer whose Grams may cancel: their share of ‖g_b‖² (in ``shares``)
    becomes the bound of their own float64 per-example gradient, and that gradient is their update."""
    if not flagged:
        return
    _, S, n, direct = layer.cancel
    i = next(i for i, (owner, _) in enumerate(shares) if owner is layer)
    bound = shares[i][1].clone()
    for b in flagged:
        W = layer.exact[b] = direct(b).double()
        exact = (torch.linalg.vector_norm(W) * (1 + 4 * _U64) + _gamma(n) * 1.1 * S[b]).square()
        bound[b] = exact  # its update is this W itself (float64), not the fused product
    shares[i] = (layer, bound)


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """No TF32 in the engine's own products on CUDA (PyTorch lets cuDNN use it by default): the
    rounding bounds of :func:`_ghost_sq` assume float32's unit round-off."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _as_computed(module: nn.Module, a: Tensor) -> Tensor:
    """The input as the layer's op actually used it: under autocast, Linear and convolutions run on
    inputs cast to the autocast dtype, so their exact per-example gradient is g_bᵀ·cast(a_b), not
    g_bᵀ·a_b. (Normalisations run in float32 under autocast; embeddings read indices.)"""
    if (
        isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
        and a.is_floating_point()
        and torch.is_autocast_enabled(a.device.type)
    ):
        return a.to(torch.get_autocast_dtype(a.device.type))
    return a


def _exact_inputs(layer: _Layer, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The recorded (a, g) in the parameters' precision: under autocast a layer's input and output
    gradient may be bfloat16/float16; upcasting is exact, and the engine's norms and sums then
    never run in half precision. Integer inputs (an Embedding's indices) stay as they are."""
    dtype = layer.params[0][1].dtype
    if a.is_floating_point() and a.dtype != dtype:
        a = a.to(dtype)
    return a, (g.to(dtype) if g.dtype != dtype else g)


def _has(layer: _Layer, name: str) -> bool:
    return any(n == name for n, _ in layer.params)


def _linear(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    A = a.reshape(B, -1, a.shape[-1])  # [B, K·T, d]
    G = g.reshape(B, -1, g.shape[-1])  # [B, K·T, p]
    sq = None  # the weight's share of ‖g_b‖² (the bias is normed with the other small gradients)
    if _has(layer, "weight"):
        if _use_ghost(A.shape[1], G.shape[2], A.shape[2]):
            sq = _ghost_sq(layer, A, G, B, lambda b: G[b].double().T @ A[b].double())  # ∇W_b = G_bᵀ A_b
            layer.saved = (a, g)
        else:
            W = torch.bmm(G.transpose(1, 2), A)  # ∇W_b = G_bᵀ A_b, [B, p, d]
            sq = _sq_norms(W)
            layer.direct["weight"] = W
    if _has(layer, "bias"):
        layer.small["bias"] = G.sum(1)  # ∇bias_b = 1ᵀ G_b
    return sq


def _conv(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    m = layer.module
    dims = a.ndim - 2
    groups, p, T = m.groups, m.out_channels, g[0, 0].numel()
    d = m.in_channels // groups * m.weight[0, 0].numel()
    sq = None  # the weight's share of ‖g_b‖² (the bias is normed with the other small gradients)
    if _has(layer, "weight"):
        if _use_ghost(a.shape[0] // B * T, p // groups, d):
            G = g.reshape(B, -1, groups, p // groups, T)  # [B, K, γ, p/γ, T]
            U = _unfold(m, a, dims).reshape(B, -1, groups, d, T)  # [B, K, γ, d, T]
            Ug = U.permute(0, 2, 1, 4, 3).reshape(B * groups, -1, d)  # [B·γ, K·T, d]
            Gg = G.permute(0, 2, 1, 4, 3).reshape(B * groups, -1, p // groups)
            rows = a.shape[0] // B
            sq = _ghost_sq(
                layer,
                Ug,
                Gg,
                B,
                lambda b: _per_example_conv_grouped(
                    m, a[b * rows : (b + 1) * rows].double(), g[b * rows : (b + 1) * rows].double(), 1, dims
                )[0],
            )
            layer.saved = (a, g)
        else:
            W, sq = _per_example_conv_weight(m, a, g, B, dims)  # [B, *weight.shape], ‖W_b‖²
            layer.direct["weight"] = W
    if _has(layer, "bias"):
        layer.small["bias"] = _rows(g.sum(tuple(range(2, g.ndim))), B).sum(1)  # Σ over draws and positions
    return sq


def _unfold(m: nn.Module, a: Tensor, dims: int) -> Tensor:
    """im2col [R, C_in·k…, T] of a zero-padded convolution's input."""
    if dims == 2:
        return F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    if dims == 1:  # as a 2-D convolution of height 1
        return F.unfold(
            a.unsqueeze(2),
            (1, m.kernel_size[0]),
            dilation=(1, m.dilation[0]),
            padding=(0, m.padding[0]),
            stride=(1, m.stride[0]),
        )
    k, s, pd, dl = m.kernel_size, m.stride, m.padding, m.dilation  # 3-D: pad, then strided windows
    x = F.pad(a, [q for pp in reversed(pd) for q in (pp, pp)])
    for i in range(3):
        x = x.unfold(2 + i, dl[i] * (k[i] - 1) + 1, s[i])[..., :: dl[i]]
    # x: [R, C, To1, To2, To3, k1, k2, k3] -> [R, C·k1·k2·k3, T]
    R, C = x.shape[:2]
    return x.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(R, C * k[0] * k[1] * k[2], -1)


def _per_example_conv_weight(m: nn.Module, a: Tensor, g: Tensor, B: int, dims: int) -> tuple[Tensor, Tensor]:
    """∇W_b = Σ_{k,t} g_{b,k,t} ⊗ patch_{b,k,t}: the weight gradient of each example's K rows, [B, *weight.shape], and ‖∇W_b‖².

    Every kernel here is exact; which one is fastest depends on the layer's shape, the batch and
    the machine by factors of 3 either way (docs/benchmarks.md), so the candidates that apply are
    timed once per layer shape and batch-size bucket and the fastest is kept (like cuDNN's
    benchmark mode). Under ``torch.use_deterministic_algorithms(True)`` the first candidate is
    always used, so runs repeat bit for bit.
    """
    kernels = [_per_example_conv_grouped]
    if dims == 2 and _taps_apply(m):
        kernels.append(_per_example_conv2d_taps)
    if len(kernels) == 1 or torch.are_deterministic_algorithms_enabled():
        return kernels[0](m, a, g, B, dims)
    # Poisson batches change size every step: key on the batch's power-of-two bucket, not its exact size,
    # so the kernels are timed once per bucket (≈ 2 per run), not once per batch size seen (≈ 100).
    key = (
        m.in_channels,
        m.out_channels,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        tuple(a.shape[1:]),
        a.shape[0] // B,
        B.bit_length(),
        a.dtype,
        a.device,
        torch.get_num_threads(),
    )
    kernel = _KERNEL_CHOICE.get(key)
    if kernel is None:  # best of three timed calls each, after a warm-up
        kernel = _KERNEL_CHOICE[key] = min(kernels, key=lambda k: _seconds(k, m, a, g, B, dims))
    return kernel(m, a, g, B, dims)


_KERNEL_CHOICE: dict[tuple, object] = {}  # layer signature -> fastest per-example kernel (this process)


def _seconds(kernel, *args, repeats: int = 3) -> float:
    """Fastest wall time of ``repeats`` calls after a warm-up call (synchronised on accelerators)."""
    sync = torch.cuda.synchronize if args[1].is_cuda else (lambda: None)
    kernel(*args)
    best = math.inf
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        kernel(*args)
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _per_example_conv_grouped(m: nn.Module, a: Tensor, g: Tensor, B: int, dims: int) -> tuple[Tensor, Tensor]:
    """Autograd's own weight-gradient kernel with the examples folded into the groups (any convolution)."""
    K = a.shape[0] // B
    w = m.weight
    a_k = a.reshape(B, K, *a.shape[1:]).transpose(0, 1).reshape(K, B * a.shape[1], *a.shape[2:])
    g_k = g.reshape(B, K, *g.shape[1:]).transpose(0, 1).reshape(K, B * g.shape[1], *g.shape[2:])
    W = _CONV_WEIGHT_GRAD[dims](a_k, (B * w.shape[0], *w.shape[1:]), g_k, m.stride, m.padding, m.dilation, B * m.groups)
    return W.reshape(B, *w.shape), _sq_norms(W.reshape(B, *w.shape))


def _taps_apply(m: nn.Module) -> bool:
    """A stride-1, "same"-padded 2-D convolution with odd kernel (3×3, 1×1, ...): the tap kernel applies."""
    kh, kw = m.kernel_size
    return (
        m.groups == 1
        and m.stride == (1, 1)
        and m.dilation == (1, 1)
        and kh % 2 == 1
        and kw % 2 == 1
        and m.padding == (kh // 2, kw // 2)
    )


def _per_example_conv2d_taps(m: nn.Module, a: Tensor, g: Tensor, B: int, dims: int) -> tuple[Tensor, Tensor]:
    """Per-example weight gradient of a stride-1 "same" conv as one batched matrix product per tap.

    Tap (i, j) pairs output position t with input position t + δ, δ = (i − P)·W + (j − Q), on the
    flattened H·W grid. On the unpadded input that is a contiguous window: positions whose partner
    falls above or below the image are cut from the range, and those whose partner would wrap
    around a row's end are zeroed in a copy of g (one copy per column shift, of the output
    gradient only). So ∇W_b[:, :, i, j] = Σ_t a_b[:, t + δ]·g_b[:, t]ᵀ, one bmm per tap and draw,
    with no padded or unfolded copy of the input. Returned as a [B, *weight.shape] view of a
    tap-major buffer (norms and clipped sums read it in place).
    """
    kh, kw = m.kernel_size
    P, Q = kh // 2, kw // 2
    R, C, H, W = a.shape
    K, T, p = R // B, H * W, m.out_channels
    a = a.contiguous()
    out = torch.empty(kh * kw, B, C, p, dtype=a.dtype, device=a.device)
    taps = out.unbind(0)
    for j in range(kw):
        dx = j - Q  # input column = output column + dx
        g_j = g.contiguous() if dx == 0 else g.clone(memory_format=torch.contiguous_format)
        if dx > 0:  # output columns w ≥ W − dx would read input columns past the right edge
            g_j[..., W - dx :] = 0
        elif dx < 0:  # and columns w < −dx past the left edge
            g_j[..., :-dx] = 0
        for i in range(kh):
            delta = (i - P) * W + dx
            t0, t1 = max(0, -delta), min(T, T - delta)  # output positions whose input row is on the image
            for k in range(K):  # the K draws of each example summed into its gradient
                window = a.as_strided((B, C, t1 - t0), (K * C * T, T, 1), a.storage_offset() + k * C * T + t0 + delta)
                gT = g_j.as_strided((B, t1 - t0, p), (K * p * T, 1, T), g_j.storage_offset() + k * p * T + t0)
                if k == 0:
                    torch.bmm(window, gT, out=taps[i * kw + j])
                else:
                    taps[i * kw + j].baddbmm_(window, gT)
    W = out.permute(1, 3, 2, 0).unflatten(3, (kh, kw))  # [B, C_out, C_in, kh, kw], a view
    return W, _sq_norms(W)


def _group_norm(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    """GroupNorm: ∇γ_b[c] = Σ_{k,t} x̂·g and ∇β_b[c] = Σ_{k,t} g, with x̂ = (a − μ)·rstd per row and group.

    Computed by autograd's own GroupNorm backward kernel, asked for the affine gradients of ONE
    "row" with R·C channels in R·groups groups: row r's group j is merged group r·groups + j, so
    the kernel's per-channel sums are exactly the per-row ones, in one fused pass over (a, g).
    μ and rstd are the ones the forward computed, when autograd kept them.
    """
    m = layer.module
    R, C = a.shape[:2]
    T = a[0, 0].numel()  # positions (1 when there are none)
    if layer.stats is not None:
        mean, rstd = layer.stats
    else:  # recompute with the forward's kernel
        _, mean, rstd = torch.native_group_norm(a.contiguous(), None, None, R, C, T, m.num_groups, m.eps)
    G = m.num_groups
    # the kernel reads both as contiguous [N, C, T] (a strided view gives wrong sums, not an error)
    _, w_rows, b_rows = torch.ops.aten.native_group_norm_backward(
        g.contiguous().view(1, R * C, T),
        a.contiguous().view(1, R * C, T),
        mean.reshape(1, R * G),
        rstd.reshape(1, R * G),
        torch.ones(R * C, dtype=a.dtype, device=a.device),
        1,
        R * C,
        T,
        R * G,
        [False, True, True],
    )
    return _affine_grads(layer, lambda: w_rows.view(R, C), b_rows.view(R, C), B)


def _forward_group_norm_stats(out: Tensor, a: Tensor) -> tuple[Tensor, Tensor] | None:
    """(μ, rstd) [R, groups] that autograd saved for GroupNorm's backward, if ``out`` came from ``a`` that way."""
    fn = out.grad_fn
    if fn is None or fn.name() != "NativeGroupNormBackward0":
        return None
    try:
        saved, mean, rstd = fn._saved_input, fn._saved_result1, fn._saved_result2
    except (AttributeError, RuntimeError):
        return None
    if saved.data_ptr() != a.data_ptr() or saved.shape != a.shape or saved.stride() != a.stride():
        return None  # normalised a copy (e.g. channels-last made contiguous): recompute instead
    return mean.detach(), rstd.detach()


def _layer_norm(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    """LayerNorm: the same sums over every position of the row (the affine is over the last dims)."""
    m = layer.module
    x_hat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
    shape = (a.shape[0], -1, *m.normalized_shape)  # [R, positions, *normalized_shape]
    return _affine_grads(layer, lambda: (x_hat * g).reshape(shape).sum(1), g.reshape(shape).sum(1), B)


def _affine_grads(layer: _Layer, weight_rows, bias_rows: Tensor, B: int) -> None:
    """Per-example (Σ over the K rows) weight and bias gradients of a normalisation's affine: small, normed with the others."""
    if _has(layer, "weight"):
        layer.small["weight"] = _rows(weight_rows(), B).sum(1).reshape(B, -1)
    if _has(layer, "bias"):
        layer.small["bias"] = _rows(bias_rows, B).sum(1).reshape(B, -1)


def _embedding(bk: BookKeeping, layer: _Layer, a: Tensor, g: Tensor, B: int) -> Tensor:
    """Embedding: ∇E_b has one row per distinct index of example b, the sum of g over the positions holding it.

    Those row sums are formed per example in float64 (each position's g added to the slot of the
    first position with the same index), so ‖∇E_b‖² is a sum of squares, never a cancelling
    difference; its rounding (at most γ_n·Σ_i ‖g_i‖ in norm, n = K·L positions) is added as a bound.
    """
    idx = a.reshape(B, -1)  # [B, n] the rows' indices, n = K·L
    G = g.reshape(B, idx.shape[1], -1).double()  # [B, n, e]
    if layer.module.padding_idx is not None:  # rows at padding_idx get no gradient
        G = G * (idx != layer.module.padding_idx)[:, :, None]
    first = (idx[:, :, None] == idx[:, None, :]).to(torch.uint8).argmax(2)  # [B, n] first position with the same index
    rows = torch.zeros_like(G).scatter_add_(1, first[:, :, None].expand_as(G), G)  # [B, n, e] ∇E_b's non-zero rows
    layer.saved = (idx.gather(1, first), rows)  # the clipped sum adds c_b·rows_b at these indices, in float64
    slack = _gamma(idx.shape[1]) * 1.1 * torch.linalg.vector_norm(G, dim=2).sum(1)
    return (torch.linalg.vector_norm(rows, dim=(1, 2)) * (1 + 4 * _U64) + slack).square()


# The supported trainable layers: this table is the list. A layer's rule is found through its class's
# MRO, so subclasses of these (e.g. a pretrained UNet's ``GroupNorm32(nn.GroupNorm)``) use their base's rule.
_LAYER_RULES = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}
SUPPORTED = tuple(_LAYER_RULES)


def layer_rule(module: nn.Module):
    """The per-example rule for ``module``'s class, looked up through its MRO; None when unsupported."""
    return next((_LAYER_RULES[cls] for cls in type(module).__mro__ if cls in _LAYER_RULES), None)


def _clipped_sum(layer: _Layer, c: Tensor) -> dict[str, Tensor]:
    """Σ_b c_b ∇_b for each of the layer's parameters."""
    m, out = layer.module, {}
    for name, per_example in layer.direct.items():
        out[name] = _weighted_sum(c, per_example)
    if layer.saved is not None and isinstance(m, nn.Embedding):
        slots, rows = layer.saved  # Σ_b c_b ∇E_b: each example's row sums, scaled, added at their indices
        rows_c = rows * c.to(rows.dtype).view(-1, 1, 1)
        grad = torch.zeros(m.weight.shape, dtype=torch.float64, device=rows.device).index_add_(
            0, slots.reshape(-1), rows_c.reshape(-1, rows.shape[-1])
        )
        if m.padding_idx is not None:
            grad[m.padding_idx] = 0
        out["weight"] = grad
    elif layer.saved is not None:
        a, g = layer.saved
        c_ex = c
        if layer.exact:  # examples whose Grams cancelled enter through their exact gradient below
            c_ex = c.clone()
            c_ex[list(layer.exact)] = 0
        # each example's factor on its K rows (expand, not repeat_interleave: no output size to read back)
        c_rows = c_ex[:, None].expand(-1, a.shape[0] // c.shape[0]).reshape(-1).to(g.dtype)
        g_c = g * c_rows.view(-1, *[1] * (g.ndim - 1))  # c-scaled output gradients: ONE weighted gradient
        if isinstance(m, nn.Linear):
            out["weight"] = g_c.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        else:  # convolution
            dims = a.ndim - 2
            out["weight"] = _CONV_WEIGHT_GRAD[dims](a, m.weight.shape, g_c, m.stride, m.padding, m.dilation, m.groups)
        for b, W in layer.exact.items():
            out["weight"] = out["weight"] + (c[b].double() * W).to(out["weight"].dtype).reshape(out["weight"].shape)
    return out
