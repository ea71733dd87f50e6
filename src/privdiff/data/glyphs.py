"""``glyphs``: a PUBLIC data set of digit glyphs 0-9, rendered offline from fonts matplotlib ships.

It is public by construction: the generator takes no data argument and reads nothing but the twelve
DejaVu font files in matplotlib's ``mpl-data/fonts/ttf`` (DejaVu Sans, Sans Mono and Serif, each in
Book, Bold, Oblique/Italic and Bold Oblique/Bold Italic; Sans Mono's dotted zero is left out). No example
of any data set ever touches it.

Each example is drawn like an MNIST digit: white strokes on black, 1 channel, the digit's larger side
fitted into a box of 20/28 of the image and its centre of mass put at the centre, then varied by a
random font, stroke width, aspect, slant, rotation, scale, shift and an elastic deformation
(:class:`GlyphStyle`). The steps, for one example of class ``d`` at resolution ``r``:

1. **Glyph.** Once per (font, digit): render at ``_FONT_PX`` pixels with PIL and keep its signed
   distance field ``sdf(u)`` (negative inside the strokes, positive outside, in source pixels), its
   ink centroid ``c`` and the vertices of its ink's convex hull.
2. **Linear part.** ``L = R(θ) · Sh(k) · diag(a, 1)``: horizontal stretch ``a``, slant ``k`` (the top
   leans right for k > 0: ``x ← x − k·y`` with y pointing down), rotation ``θ``.
3. **MNIST normalisation.** The hull of ``L·(u − c)`` has width ``w`` and height ``h``; the scale
   ``s = (box · r · z − Δ − ω) / max(w, h)`` (output pixels per source pixel, ``z`` a random scale,
   ``Δ`` the stroke-width change and ``ω`` the edge ramp below, both in output pixels, which widen the
   ink by as much) fits its larger side into the box. The forward map is ``p = s·L·(u − c) + r/2 + t``: an affine map sends
   the centroid to the centroid, so the centre of mass lands at the centre plus a random shift ``t``.
4. **Elastic deformation** (Simard et al. 2003): a field ``e(p)`` of uniform noise smoothed by a
   Gaussian of std ``elastic_sigma · r`` and scaled to RMS ``ρ · r``; output point ``p`` shows the
   glyph at ``p + e(p)``.
5. **Sampling.** On a supersampled grid of ``(r·ss)²`` points, ``u = c + L⁻¹·(p + e(p) − r/2 − t)/s``;
   the SDF there, offset by ``δ = Δ / (2s)`` (half the stroke-width change, in source pixels: dilation for
   ``δ > 0``, erosion for ``δ < 0``, exact with a round pen because the SDF is Euclidean), becomes ink
   ``clip(1/2 − (sdf − δ)/ω, 0, 1)`` with a ramp ``ω`` of ``edge`` output pixels (anti-aliased
   edges like MNIST's); averaging each ``ss × ss`` block gives the pixel.

Example ``i`` has label ``i mod 10`` (class-balanced: counts differ by at most one) and is drawn from
its own generator ``numpy.random.default_rng([version, seed, split, i])``, so a larger set begins
with the smaller one and every example is reproducible on its own. ``train`` and ``test`` are drawn
from different streams; ``all`` is ``train`` followed by ``test``. Sets are cached under
``$PRIVDIFF_CACHE/glyphs`` (default ``~/.cache/privdiff/glyphs``), named by the sha256 of the
generator version, the style, the font files' content, the seed, the split, the size and the
resolution; a damaged or mismatching cache file is regenerated, never trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_bytes
from ..runtime import cache_dir
from .builtin import DIGIT_NAMES
from .dataset import DatasetError, ImageDataset, _check_split, _to_dataset

__all__ = [
    "FONT_FILES",
    "GENERATOR_VERSION",
    "GLYPH_SIZES",
    "GlyphStyle",
    "glyph_images",
    "load_glyphs",
    "render_glyphs",
]

GENERATOR_VERSION = 1  # bump whenever the drawing changes: the cache key and the streams follow it
GLYPH_SIZES: dict[str, int] = {"train": 6000, "test": 1000}  # default examples per split ("all": both)
NATIVE_RESOLUTION = 28  # the resolution when none is asked for (MNIST's)

FONT_FILES: tuple[str, ...] = tuple(
    f"DejaVu{family}{style}.ttf"
    for family, styles in (
        ("Sans", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("SansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("Serif", ("", "-Bold", "-Italic", "-BoldItalic")),
    )
    for style in styles
)
"""The twelve faces drawn from, in matplotlib's ``mpl-data/fonts/ttf``."""
# DejaVu Sans Mono's zero has a dot inside, which no handwritten zero has: its faces draw 1-9 only
_NO_ZERO = "DejaVuSansMono"

_SPLIT_STREAM = {"train": 0, "test": 1}
_FONT_PX = 128  # font size of the source glyphs (digits ~93 px tall): far finer than any supersampled grid needs
_MARGIN = 24  # source pixels of background around each glyph: more than any dilation reaches
_MAX_GRID_POINTS = 1 << 22  # supersampled points per chunk of examples (memory: ~17 MB per float32 buffer)


@dataclass(frozen=True)
class GlyphStyle:
    """How much the examples vary; each ``(lo, hi)`` is drawn uniformly, each ``x`` from ``[-x, x]``.

    Lengths are fractions of the image side, so a style means the same at every resolution (the
    comment gives pixels at 28).
    """

    box: float = 20 / 28  # the digit's larger side is fitted into this (MNIST: 20 px of 28)
    scale: tuple[float, float] = (0.9, 1.08)  # z: random scale after fitting
    aspect: tuple[float, float] = (0.8, 1.25)  # a: horizontal over vertical stretch, before fitting
    slant: tuple[float, float] = (-0.15, 0.35)  # k: shear x ← x − k·y (positive: leaning right)
    rotation: float = 12.0  # θ in degrees
    shift: float = 1.0 / 28  # t: shift of the centre of mass (±1 px)
    stroke: tuple[float, float] = (-0.3 / 28, 1.2 / 28)  # Δ: change of stroke width (−0.3 .. +1.2 px)
    elastic_sigma: float = 4 / 28  # std of the Gaussian that smooths the elastic field (Simard: 4 px)
    elastic: tuple[float, float] = (0.0, 1.0 / 28)  # ρ: RMS displacement of the elastic field (0 .. 1 px)
    edge: float = 1.0 / 28  # ω: width of the anti-aliased edge ramp (1 px)
    supersample: int = 4  # ss at 28 px (more at smaller resolutions: the grid has at least 112 points a side)

    def __post_init__(self) -> None:
        ranges = {"scale": self.scale, "aspect": self.aspect, "slant": self.slant, "stroke": self.stroke}
        ranges["elastic"] = self.elastic
        for name, pair in ranges.items():
            if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or pair[0] > pair[1]:
                raise ValueError(f"GlyphStyle.{name} must be a finite (low, high) pair with low <= high, got {pair}")
        positive = {"box": self.box, "elastic_sigma": self.elastic_sigma, "edge": self.edge}
        positive |= {"scale low": self.scale[0], "aspect low": self.aspect[0]}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"GlyphStyle.{name} must be > 0, got {value}")
        if not (0 <= self.rotation <= 180 and 0 <= self.shift < 0.5 and self.elastic[0] >= 0):
            raise ValueError("GlyphStyle: rotation must be in [0, 180], shift in [0, 0.5), elastic >= 0")
        if self.stroke[1] + self.edge >= self.box * self.scale[0] / 2:
            raise ValueError("GlyphStyle: stroke's high + edge must be below half of box * scale's low")
        if isinstance(self.supersample, bool) or not isinstance(self.supersample, int) or self.supersample < 1:
            raise ValueError(f"GlyphStyle.supersample must be a positive int, got {self.supersample!r}")


# -- the source glyphs --------------------------------------------------------------------------------
def font_dir() -> Path:
    """matplotlib's bundled TrueType fonts (``mpl-data/fonts/ttf``)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=1)
def _fonts() -> tuple[tuple[str, bytes, str], ...]:
    """``(file name, content, sha256)`` of each of :data:`FONT_FILES`, read once per process."""
    folder, fonts = font_dir(), []
    for name in FONT_FILES:
        path = folder / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DatasetError(f"glyphs: matplotlib's font {path} cannot be read ({e.strerror or e})") from None
        fonts.append((name, data, hashlib.sha256(data).hexdigest()))
    return tuple(fonts)


@dataclass(frozen=True)
class _Glyphs:
    """Every (font, digit) source glyph on one canvas size, and which ones each digit draws from."""

    sdf: torch.Tensor  # float32 [G, 1, H, W]: signed distance to the stroke edge, in source pixels
    centroid: np.ndarray  # float64 [G, 2]: (x, y) of the ink's centre of mass
    hulls: tuple[np.ndarray, ...]  # G arrays [V, 2]: vertices of the ink's convex hull (x, y)
    of_digit: tuple[np.ndarray, ...]  # 10 arrays: the glyph indices of each digit


@functools.lru_cache(maxsize=1)
def _glyphs() -> _Glyphs:
    """Render every source glyph once per process (~0.8 s) and derive its SDF, centroid and hull."""
    from PIL import Image, ImageDraw, ImageFont
    from scipy.ndimage import distance_transform_edt
    from scipy.spatial import ConvexHull

    masks, digit_of = [], []
    for name, data, _ in _fonts():
        font = ImageFont.truetype(io.BytesIO(data), _FONT_PX)
        for d in range(10):
            if d == 0 and name.startswith(_NO_ZERO):
                continue
            left, top, right, bottom = font.getbbox(str(d))
            canvas = Image.new("L", (right - left + 2 * _MARGIN, bottom - top + 2 * _MARGIN), 0)
            ImageDraw.Draw(canvas).text((_MARGIN - left, _MARGIN - top), str(d), fill=255, font=font)
            ink = np.asarray(canvas) >= 128
            if not ink.any():
                raise DatasetError(f"glyphs: matplotlib's font {name} draws no digit {d}")
            masks.append(ink)
            digit_of.append(d)
    # one canvas size for all, each glyph centred on it (they are stacked into one atlas when drawn)
    H, W = max(m.shape[0] for m in masks), max(m.shape[1] for m in masks)
    sdf = np.empty((len(masks), 1, H, W), dtype=np.float32)
    centroid, hulls = np.empty((len(masks), 2)), []
    for g, m in enumerate(masks):
        top, left = (H - m.shape[0]) // 2, (W - m.shape[1]) // 2
        ink = np.zeros((H, W), dtype=bool)
        ink[top : top + m.shape[0], left : left + m.shape[1]] = m
        # Euclidean distance from each pixel centre to the nearest pixel centre of the other kind; the edge
        # lies half a pixel before it, so sdf = d_out − 1/2 outside and 1/2 − d_in inside
        sdf[g, 0] = np.where(ink, 0.5 - distance_transform_edt(ink), distance_transform_edt(~ink) - 0.5)
        ys, xs = np.nonzero(ink)
        points = np.stack([xs + 0.5, ys + 0.5], axis=1)  # pixel centres, (x, y), origin at the canvas corner
        centroid[g] = points.mean(axis=0)
        hulls.append(points[ConvexHull(points).vertices])
    labels = np.asarray(digit_of)
    return _Glyphs(
        sdf=torch.from_numpy(sdf),
        centroid=centroid,
        hulls=tuple(hulls),
        of_digit=tuple(np.flatnonzero(labels == d) for d in range(10)),
    )


# -- drawing --------------------------------------------------------------------------------------------
def _check_options(n: int, resolution: int, seed: int, split: str) -> None:
    for name, value, low in (("n", n, 1), ("resolution", resolution, 4), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise DatasetError(f"glyphs: {name} must be an int >= {low}, got {value!r}")
    if split not in _SPLIT_STREAM:
        raise DatasetError(f"glyphs: split must be 'train' or 'test' here ('all' is load_glyphs'), got {split!r}")


def render_glyphs(
    n: int,
    *,
    resolution: int = NATIVE_RESOLUTION,
    seed: int = 0,
    split: str = "train",
    style: GlyphStyle = GlyphStyle(),
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` digit glyphs (no cache; :func:`glyph_images` caches). Reads only the font files.

    Args:
        n: Number of examples; example ``i`` is digit ``i mod 10``.
        resolution: Side length in pixels (at least 4).
        seed: Non-negative seed; with ``split`` and ``i`` it fixes example ``i`` entirely.
        split: ``"train"`` or ``"test"``: two independent streams of examples.
        style: The ranges of the random variation.

    Returns:
        ``(images, labels)``: uint8 ``[n, 1, resolution, resolution]`` (white strokes on black) and int64 ``[n]``.

    Raises:
        DatasetError: A bad option (one line), or matplotlib's fonts are missing.
    """
    _check_options(n, resolution, seed, split)
    glyphs, r = _glyphs(), int(resolution)
    H, W = (int(v) for v in glyphs.sdf.shape[-2:])
    ss = max(style.supersample, math.ceil(style.supersample * NATIVE_RESOLUTION / r))
    R = r * ss  # the supersampled grid
    labels = np.arange(n, dtype=np.int64) % 10

    # per example: glyph g, inverse map u = A·(p + e(p)) + b, stroke offset δ and ramp ω (source px), field RMS ρ
    g_idx, A, b, delta, ramp = np.empty(n, np.int64), np.empty((n, 2, 2)), np.empty((n, 2)), np.empty(n), np.empty(n)
    noise = np.empty((n, 2, r, r), dtype=np.float32)
    rms = np.empty(n)
    for i in range(n):
        rng = np.random.default_rng([GENERATOR_VERSION, int(seed), _SPLIT_STREAM[split], i])
        choices = glyphs.of_digit[labels[i]]
        g = int(choices[rng.integers(len(choices))])
        z, a, k = rng.uniform(*style.scale), rng.uniform(*style.aspect), rng.uniform(*style.slant)
        theta = math.radians(rng.uniform(-style.rotation, style.rotation))
        t = rng.uniform(-style.shift, style.shift, size=2) * r
        stroke = rng.uniform(*style.stroke) * r
        rms[i] = rng.uniform(*style.elastic) * r
        noise[i] = rng.uniform(-1.0, 1.0, size=(2, r, r))
        # L = R(θ) · Sh(k) · diag(a, 1)
        cos, sin = math.cos(theta), math.sin(theta)
        L = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, -k], [0.0, 1.0]]) @ np.diag([a, 1.0])
        hull = (glyphs.hulls[g] - glyphs.centroid[g]) @ L.T
        # output px per source px; the stroke change and the edge ramp add (stroke + ω) to the ink's extent
        s = (style.box * r * z - stroke - style.edge * r) / max(np.ptp(hull[:, 0]), np.ptp(hull[:, 1]))
        A[i] = np.linalg.inv(L) / s
        b[i] = glyphs.centroid[g] - A[i] @ (r / 2 + t)
        g_idx[i], delta[i], ramp[i] = g, stroke / 2 / s, style.edge * r / s

    # the elastic fields: smoothed noise, each scaled to its RMS ρ (in output px)
    from scipy.ndimage import gaussian_filter

    sigma = style.elastic_sigma * r
    fields = gaussian_filter(noise, sigma=(0, 0, sigma, sigma), mode="reflect")
    fields *= (rms / np.sqrt(np.mean(fields**2, axis=(1, 2, 3)) + 1e-12)).astype(np.float32)[:, None, None, None]
    fields_t = torch.from_numpy(fields)

    # all glyphs' SDFs stacked into one column [1, 1, G·H, W]: one grid_sample call reads every example's glyph
    n_glyphs = glyphs.sdf.shape[0]
    atlas = glyphs.sdf.reshape(1, 1, n_glyphs * H, W)
    centres = (torch.arange(R, dtype=torch.float32) + 0.5) / ss  # supersample centres, in output px
    py, px = torch.meshgrid(centres, centres, indexing="ij")  # [R, R]
    out = np.empty((n, 1, r, r), dtype=np.uint8)
    chunk = max(1, _MAX_GRID_POINTS // (R * R))
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        m = sl.stop - sl.start
        e = F.interpolate(fields_t[sl], size=(R, R), mode="bilinear", align_corners=False)  # [m, 2, R, R]
        qx, qy = px + e[:, 0], py + e[:, 1]  # where each output point looks: p + e(p)
        a = torch.from_numpy(A[sl]).float()[:, :, :, None, None]  # [m, 2, 2, 1, 1]
        c = torch.from_numpy(b[sl]).float()[:, :, None, None]  # [m, 2, 1, 1]
        ux = a[:, 0, 0] * qx + a[:, 0, 1] * qy + c[:, 0]  # u = A·(p + e(p)) + b, in source px of the glyph
        uy = a[:, 1, 0] * qx + a[:, 1, 1] * qy + c[:, 1]
        # stay inside the glyph's own cell (its background margin continues outward: grid_sample's "border"),
        # then move down to its row of the atlas
        ux = ux.clamp_(0.5, W - 0.5)
        uy = uy.clamp_(0.5, H - 0.5) + (torch.from_numpy(g_idx[sl]).float() * H)[:, None, None]
        # grid_sample's [-1, 1] coordinates (align_corners=False: -1 and 1 are the outer edges of the atlas)
        grid = torch.stack([2 * ux / W - 1, 2 * uy / (n_glyphs * H) - 1], dim=-1)
        sdf = F.grid_sample(atlas, grid.reshape(1, m * R, R, 2), mode="bilinear", align_corners=False)
        sdf = sdf.reshape(m, 1, R, R)
        d = torch.from_numpy(delta[sl]).float()[:, None, None, None]
        w = torch.from_numpy(ramp[sl]).float()[:, None, None, None]
        ink = (0.5 - (sdf - d) / w).clamp_(0.0, 1.0)
        pixels = F.avg_pool2d(ink, ss)  # coverage of each output pixel
        out[sl] = (pixels * 255).round_().to(torch.uint8).numpy()
    return out, labels


# -- the cache ----------------------------------------------------------------------------------------------
def _cache_root() -> Path:
    return cache_dir()  # privdiff's one rule ($PRIVDIFF_CACHE or ~/.cache/privdiff), as every other cache


def _cache_key(n: int, resolution: int, seed: int, split: str, style: GlyphStyle) -> str:
    return json.dumps(
        {
            "generator": GENERATOR_VERSION,
            "fonts": {name: sha for name, _, sha in _fonts()},
            "style": dataclasses.asdict(style),
            "seed": int(seed),
            "split": split,
            "n": int(n),
            "resolution": int(resolution),
        },
        sort_keys=True,
    )


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _read_cache(path: Path, key: str, n: int, resolution: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached set, or None when the file is absent, unreadable, for another key, or altered."""
    try:
        with np.load(path, allow_pickle=False) as f:
            stored_key, digest = str(f["key"]), str(f["digest"])
            images, labels = f["images"], f["labels"]
    except Exception:  # noqa: BLE001  absent, truncated, not a zip, missing arrays: all mean "draw it again"
        return None
    if (
        stored_key != key
        or images.dtype != np.uint8
        or images.shape != (n, 1, resolution, resolution)
        or labels.dtype != np.int64
        or labels.shape != (n,)
        or _digest(images, labels) != digest
    ):
        return None
    return images, labels


def glyph_images(
    n: int,
    *,
    resolution: int = NATIVE_RESOLUTION,
    seed: int = 0,
    split: str = "train",
    style: GlyphStyle = GlyphStyle(),
    cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_glyphs`, cached on disk.

    The file is ``$PRIVDIFF_CACHE/glyphs/<sha256>.npz`` (default ``~/.cache/privdiff``), named by the
    sha256 of the generator version, the font files' content, ``style``, ``seed``, ``split``, ``n``
    and ``resolution``; it stores that key and a sha256 of its arrays, and one that is unreadable,
    holds another key or whose arrays do not match their digest is drawn again and replaced
    (written atomically). ``cache=False`` draws without reading or writing it.

    Returns:
        ``(images, labels)`` as :func:`render_glyphs`.
    """
    _check_options(n, resolution, seed, split)
    if not cache:
        return render_glyphs(n, resolution=resolution, seed=seed, split=split, style=style)
    key = _cache_key(n, resolution, seed, split, style)
    path = _cache_root() / "glyphs" / f"{hashlib.sha256(key.encode()).hexdigest()}.npz"
    hit = _read_cache(path, key, int(n), int(resolution))
    if hit is not None:
        return hit
    images, labels = render_glyphs(n, resolution=resolution, seed=seed, split=split, style=style)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, labels=labels, key=np.array(key), digest=np.array(_digest(images, labels)))
    atomic_write_bytes(path, buf.getvalue())
    return images, labels


# -- the data set ---------------------------------------------------------------------------------------------
def load_glyphs(
    *, split: str = "train", resolution: int | None = None, size: int | None = None, seed: int = 0
) -> ImageDataset:
    """The ``glyphs`` data set: rendered digit glyphs (1×r×r, 10 classes "0".."9"), public by construction.

    Args:
        split: ``"train"`` (6,000 by default), ``"test"`` (1,000, a separate stream) or ``"all"`` (both).
        resolution: Side length; drawn at it (not resized). None: 28.
        size: Examples in the training split instead of 6,000 (any positive number: a larger set
            begins with the smaller one); the test split keeps its 1,000.
        seed: Another seed draws another set of the same kind.

    Returns:
        The data set, fingerprinted by its content (so its size, seed and resolution are in the ledger's
        data identity); classes are balanced (counts differ by at most one).

    Raises:
        DatasetError: A bad split, resolution, size or seed (one line).
    """
    _check_split("glyphs", split)
    r = NATIVE_RESOLUTION if resolution is None else resolution
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
        raise DatasetError(f"glyphs: size must be a positive int or None, got {size!r}")
    sizes = {"train": GLYPH_SIZES["train"] if size is None else int(size), "test": GLYPH_SIZES["test"]}
    parts = [
        glyph_images(sizes[part], resolution=r, seed=seed, split=part)
        for part in (("train", "test") if split == "all" else (split,))
    ]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _to_dataset(images, labels, name="glyphs", split=split, num_classes=10, class_names=DIGIT_NAMES)
