"""The FID Inception-v3 network ("inception-v3-compat") as a plain ``nn.Module``.

This is the Inception graph of TensorFlow's 2015-12-05 release (``classify_image_graph_def.pb``)
that the original TTUR FID code uses, in the PyTorch port shared by pytorch-fid and
torch-fidelity: TF-style blocks (average pools that ignore the zero padding, a max pool in the
last block, BatchNorm eps 1e-3) and a 1008-way ``fc`` head. Its ``state_dict`` keys and shapes
are those of torch-fidelity 0.4.0's ``FeatureExtractorInceptionV3``, so it loads the converted
weights file ``weights-inception-2015-12-05-6726825d.pth`` that torch-fidelity and torchmetrics
download from

    https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth

(the same tensors as pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``). privdiff never
downloads it: the user passes the local file to :func:`load_fid_inception`, and
:func:`weights_sha256` names the exact weights in recorded metrics.

Why not torch-fidelity itself: its package ``__init__`` imports torchvision, and installing
torchvision replaces privdiff's CPU torch with a multi-GB CUDA build. This module needs torch only,
and plugs into ``torchmetrics.image.fid.FrechetInceptionDistance(feature=model)``.

Input convention (torch-fidelity's): images are float in [0, 1] (one channel is repeated to
three), scaled to the uint8 range (x·255), resized to 299×299 with TensorFlow 1.x
``resize_bilinear(align_corners=False)`` semantics — source coordinate = output index ·
(in/out), no half-pixel offset, no antialiasing, which differs from ``F.interpolate`` — then
mapped to [-1, 1) by (x − 128)/128. The output is the 2048-d pool3 feature (float32).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FIDInceptionV3",
    "InceptionWeightsError",
    "load_fid_inception",
    "weights_sha256",
    "INCEPTION_WEIGHTS_URL",
]

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
_INPUT_SIZE = 299


class InceptionWeightsError(ValueError):
    """The Inception weights file is missing, unreadable or does not fit the network."""


def _resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of [N, C, H, W] to size×size as TF1 ``resize_bilinear(align_corners=False)``.

    Source coordinate p = i·(in/out) in float32; lo = ⌊p⌋, hi = min(lo+1, in−1), weight p − lo.
    Interpolates along width first, then height (the order of torch-fidelity, for bit-equality).
    """

    def taps(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = torch.tensor(n_in / size, dtype=torch.float32, device=x.device)
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * scale
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, pos - lo.to(torch.float32)

    x_lo, x_hi, dx = taps(x.shape[-1])
    left, right = x.index_select(3, x_lo), x.index_select(3, x_hi)
    x = left + (right - left) * dx
    y_lo, y_hi, dy = taps(x.shape[-2])
    top, bottom = x.index_select(2, y_lo), x.index_select(2, y_hi)
    return top + (bottom - top) * dy[:, None]


class _ConvBN(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3) → ReLU; state keys ``conv.*`` and ``bn.*``."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    """3×3 stride-1 average pool whose border windows average only the real pixels (as TF)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Block35(nn.Module):
    """35×35 block (Mixed_5b/c/d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | TF avg-pool→1×1."""

    def __init__(self, c_in: int, *, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], dim=1)


class _Reduction35(nn.Module):
    """35→17 reduction (Mixed_6a): 3×3/2 | 1×1→3×3→3×3/2 | max-pool/2."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], dim=1)


class _Block17(nn.Module):
    """17×17 block (Mixed_6b–e) with factorised 7×7 convolutions and a TF avg-pool branch."""

    def __init__(self, c_in: int, *, mid: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, mid, 1)
        self.branch7x7_2 = _ConvBN(mid, mid, row[0], padding=row[1])
        self.branch7x7_3 = _ConvBN(mid, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = _ConvBN(c_in, mid, 1)
        self.branch7x7dbl_2 = _ConvBN(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_3 = _ConvBN(mid, mid, row[0], padding=row[1])
        self.branch7x7dbl_4 = _ConvBN(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_5 = _ConvBN(mid, 192, row[0], padding=row[1])
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_tf(x))], dim=1)


class _Reduction17(nn.Module):
    """17→8 reduction (Mixed_7a): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool/2."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class _Block8(nn.Module):
    """8×8 block (Mixed_7b/c) with split 1×3 / 3×1 heads.

    ``pool="avg"`` (Mixed_7b) uses the TF average pool; ``pool="max"`` (Mixed_7c) a 3×3 stride-1
    max pool, as the 2015 TF graph does (a quirk of that graph, not of the paper).
    """

    def __init__(self, c_in: int, *, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.branch3x3_1(x)
        b3 = [self.branch3x3_2a(h), self.branch3x3_2b(h)]
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = [self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)]
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), *b3, *bd, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3: float images in [0, 1], [N, 1|3, H, W] → pool3 features [N, 2048].

    Built with untrained weights; use :func:`load_fid_inception` for the real ones. The network
    always stays in eval mode (``train()`` is a no-op), so BatchNorm uses its stored statistics
    even inside a module that is switched to training. ``fc`` (1008 logits) is kept only so that
    the weights file loads strictly; ``forward`` does not use it.
    """

    num_features: int = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Block35(192, pool_features=32)
        self.Mixed_5c = _Block35(256, pool_features=64)
        self.Mixed_5d = _Block35(288, pool_features=64)
        self.Mixed_6a = _Reduction35(288)
        self.Mixed_6b = _Block17(768, mid=128)
        self.Mixed_6c = _Block17(768, mid=160)
        self.Mixed_6d = _Block17(768, mid=160)
        self.Mixed_6e = _Block17(768, mid=192)
        self.Mixed_7a = _Reduction17(768)
        self.Mixed_7b = _Block8(1280, pool="avg")
        self.Mixed_7c = _Block8(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.train(False)

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Keep eval mode whatever ``mode`` is: this is a fixed feature extractor."""
        return super().train(False)

    def preprocess(self, x: Tensor) -> Tensor:
        """[N, 1|3, H, W] floats in [0, 1] → [N, 3, 299, 299] network input in [-1, 1)."""
        if not torch.is_floating_point(x):
            raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape [N, 1 or 3, H, W], got {list(x.shape)}")
        x = x.to(torch.float32).expand(-1, 3, -1, -1) * 255
        x = _resize_bilinear_tf1(x, _INPUT_SIZE)
        return (x - 128) / 128

    def forward(self, x: Tensor) -> Tensor:
        """Pool3 features [N, 2048] (float32) of images ``x`` in [0, 1]."""
        x = self.preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def weights_sha256(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes, to name the exact weights in recorded metrics."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _first(keys: list[str], n: int = 3) -> str:
    more = f", … (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """Load the FID Inception weights from a local state-dict file (eval mode, no gradients).

    ``*.num_batches_tracked`` entries are optional (the converted TF file has none; they are
    unused in eval mode and default to 0). Raises :class:`InceptionWeightsError` if the file is
    missing, unreadable, or its keys or shapes do not match :class:`FIDInceptionV3`.
    """
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(f"Inception weights file not found: {path}")
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any load failure means an unusable file
        reason = (str(e).strip().splitlines() or [""])[0]
        raise InceptionWeightsError(f"cannot read Inception weights file {path}: {type(e).__name__}: {reason}") from e
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise InceptionWeightsError(
            f"Inception weights file {path} is not a state dict of tensors (got {type(loaded).__name__})"
        )
    state = dict(loaded)
    # Shapes only: every tensor is overwritten by the strict load below, so skip random init.
    with torch.device("meta"):
        model = FIDInceptionV3()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing {_first(missing)}"] if missing else []
        parts += [f"unexpected {_first(unexpected)}"] if unexpected else []
        raise InceptionWeightsError(f"Inception weights file {path} does not match FIDInceptionV3: {'; '.join(parts)}")
    wrong = [
        f"{k} {list(state[k].shape)} (expected {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise InceptionWeightsError(f"Inception weights file {path} has wrong shapes: {_first(wrong)}")
    for key in expected:
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, torch.zeros((), dtype=torch.long))
    model = model.to_empty(device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        reason = " ".join(str(e).split())
        raise InceptionWeightsError(f"cannot load Inception weights file {path}: {reason}") from e
    model.requires_grad_(False)
    return model.eval()
