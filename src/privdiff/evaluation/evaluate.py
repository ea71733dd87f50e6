"""``privdiff evaluate RUN``: samples, FID/KID/precision/recall, downstream accuracy, ``metrics.json``, report.

Order of work, which is the DP-safety argument for the numbers:

0. before anything costly: the run's data must have a test split (an image folder needs
   ``data.holdout`` or ``data.test_root``) and a feature network must fit its channels and
   resolution (:func:`choose_features`; colour data gets the public-photo CNN); else one line;
1. draw N class-balanced samples from the run's EMA checkpoint (cached in ``RUN/eval/``);
2. features of the samples and of the real *training* split (the FID reference, as DPDM and
   DPImageBench) under the feature network;
3. CNN and logistic regression trained on the samples, each epoch chosen on held-out
   *samples*; the same classifiers trained on the real training split (the ceiling), chosen on
   held-out *training* images; that real-data CNN labels the samples (class consistency: how
   often a sample is of the class it was drawn for);
4. only now the real test split is read: the classifiers are scored once, and the real-data floor
   of every image metric (train against test) is computed.

Every number is written with its real-data floor or ceiling beside it, and with the feature
network it was computed on. ``metrics.json`` is written atomically at the very end: a failed
evaluation leaves no partial file (and an earlier one intact).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_bytes, atomic_write_text
from ..config import Recipe, recipe_to_dict, resolve_recipe
from ..data import ImageDataset, load_dataset
from ..privacy.ledger import Ledger
from ..runs import Run, RunError, save_grid
from .classifiers import SmallCNN
from .downstream import class_consistency, score, train_classifiers
from .features import (
    FeatureNetwork,
    cached_features,
    cached_json,
    cached_tensors,
    check_photo_options,
    content_key,
    inception_network,
    is_cached,
    photo_feature_cnn,
    train_feature_cnn,
)
from .metrics import extract_features, image_metrics

SCHEMA = 1
PRIVACY_NOTE = (
    "epsilon covers training only. FID/KID/precision/recall against the training split, the real-data "
    "ceiling classifiers, the class consistency they judge and the training-loss curve are non-private "
    "statistics of the private data: share them only where the data itself may be seen."
)


def eval_dir(run: Run) -> Path:
    return run.path / "eval"


def _samples_meta(run: Run, recipe: Recipe, *, n: int, seed: int, labels: str = "balanced") -> dict[str, Any]:
    return {
        "checkpoint": run.latest_checkpoint().name,
        "n": n,
        "seed": seed,
        "sampler": recipe_to_dict(recipe)["sampler"],
        "labels": labels,
    }


def load_or_draw_samples(
    run: Run, recipe: Recipe, data: ImageDataset, *, n: int, seed: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """N samples of the run's latest EMA checkpoint, class-balanced (or, from an unconditional model such as a
    user's pretrained DDPM UNet, unlabelled: ``labels`` is empty); reused from ``RUN/eval/samples.npz`` if drawn alike."""
    from ..core.denoisers import load_decoder, load_denoiser
    from ..core.generation import generate

    denoiser = load_denoiser(run, recipe)
    conditional = denoiser.net.num_classes is not None
    if conditional and denoiser.net.num_classes != data.num_classes:
        raise RunError(f"{run.path}: the model has {denoiser.net.num_classes} classes, the data {data.num_classes}")
    kind = "balanced" if conditional else "none"
    path, meta = eval_dir(run) / "samples.npz", _samples_meta(run, recipe, n=n, seed=seed, labels=kind)
    expected = (data.channels, data.resolution, data.resolution)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                stored = json.loads(str(f["meta"])) if "meta" in f else None
                images, labels = f["images"], f["labels"]
        except Exception as e:  # a damaged .npz raises BadZipFile, EOFError, zlib.error, ValueError, KeyError...
            raise RunError(f"{path}: unreadable samples ({type(e).__name__}); delete it to draw new ones") from None
        if stored == meta:
            _check_samples(path, images, labels, expected, n=n, num_classes=data.num_classes if conditional else None)
            return images, labels
    labels_t = torch.arange(n) % data.num_classes if conditional else None
    images = generate(
        denoiser, labels=labels_t, n=n, recipe=recipe, decode=load_decoder(run), seed=seed, progress=progress
    )
    labels = labels_t.numpy().astype(np.int64) if conditional else np.zeros(0, dtype=np.int64)
    _check_samples(path, images, labels, expected, n=n, num_classes=data.num_classes if conditional else None)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images.astype(np.float32), labels=labels, meta=np.array(json.dumps(meta)))
    atomic_write_bytes(path, buf.getvalue())
    return images, labels


def _check_samples(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    expected: tuple[int, int, int],
    *,
    n: int,
    num_classes: int | None,
) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) != n:
        raise RunError(
            f"{path}: samples have shape {tuple(images.shape)}, expected ({n}, {', '.join(map(str, expected))}) "
            "(does the checkpoint match the recipe's data?)"
        )
    if num_classes is None:  # unlabelled samples of an unconditional model
        if labels.size:
            raise RunError(f"{path}: an unconditional model's samples carry no labels")
    elif labels.shape != (n,) or labels.min() < 0 or labels.max() >= num_classes:
        raise RunError(f"{path}: labels must be {n} class indices in [0, {num_classes})")
    if not np.isfinite(images).all():
        raise RunError(f"{path}: samples contain NaN or inf (the model diverged)")


FEATURE_EPOCHS = {
    "public": 30,
    "train": 30,
    "photos": 10,
}  # the feature CNN's epochs unless evaluate.feature_epochs says
FEATURE_LR = 1e-3  # Adam lr of the feature CNN: fixed, so the FID network never follows the classifier settings
CEILING_CNN = "ceiling-cnn"  # cache kind of the ceiling CNN's weights (class consistency needs the network itself)


@dataclass(frozen=True)
class FeatureChoice:
    """The feature network an evaluation will use, settled and checked before any expensive work
    (:func:`choose_features`); :meth:`build` trains it (or loads it from the cache)."""

    kind: str  # inception | public | photos | train
    data: ImageDataset | None  # what the CNN trains on (public or train); None for inception and photos
    channels: int
    resolution: int
    epochs: int
    patches: int
    inception_weights: Path | None = None

    def build(self, *, progress: bool) -> FeatureNetwork:
        if self.kind == "inception":
            return inception_network(self.inception_weights)
        if self.kind == "photos":
            return photo_feature_cnn(
                channels=self.channels,
                resolution=self.resolution,
                n=self.patches,
                epochs=self.epochs,
                lr=FEATURE_LR,
                progress=progress,
            )
        return train_feature_cnn(
            self.data, public=self.kind == "public", epochs=self.epochs, lr=FEATURE_LR, progress=progress
        )


def choose_features(recipe: Recipe, train: ImageDataset, *, inception_weights: str | Path | None) -> FeatureChoice:
    """Which feature network measures ``train``-like images, checked now (cheap: no network is trained here).

    ``--inception-weights FILE``: the standard FID Inception. Otherwise ``evaluate.features``:
    ``public``, the feature CNN on ``evaluate.public_data`` at the data's resolution, or, when that
    set's channels differ from the data's (colour data: privdiff's public sets are grayscale), the CNN
    on crops of public photographs (:func:`~privdiff.evaluation.features.photo_feature_cnn`), as
    ``photos`` asks for directly; ``train``, the CNN on the real training split (recorded as such).
    Its epochs are ``evaluate.feature_epochs`` (default :data:`FEATURE_EPOCHS`), never the downstream
    classifiers' ``evaluate.classifier_epochs``.

    Raises:
        FileNotFoundError: ``inception_weights`` is not a file.
        ValueError: No feature network fits the data (one line naming the keys that would).
    """
    e, channels, resolution = recipe.evaluate, train.channels, train.resolution
    if inception_weights is not None:
        if not Path(inception_weights).is_file():
            raise FileNotFoundError(f"{inception_weights}: --inception-weights is not a file")
        return FeatureChoice("inception", None, channels, resolution, 0, 0, Path(inception_weights))
    kind, data = e.features, train if e.features == "train" else None
    if kind == "public":
        try:
            data = load_dataset(e.public_data, root=e.public_root, split="train", resolution=resolution)
        except ValueError as err:
            raise ValueError(f"evaluate.public_data={e.public_data}: {err}") from None
        if data.channels != channels:
            kind, data = "photos", None  # no public set of the data's channels: the public photos are one
    if kind == "photos":
        try:
            check_photo_options(channels=channels, resolution=resolution, n=e.feature_patches)
        except ValueError as err:
            raise ValueError(
                f"{err}: no public feature network fits {channels}-channel {resolution}x{resolution} data; "
                "set evaluate.features=train or give --inception-weights FILE"
            ) from None
    return FeatureChoice(kind, data, channels, resolution, e.feature_epochs or FEATURE_EPOCHS[kind], e.feature_patches)


def feature_network(
    recipe: Recipe, train: ImageDataset, *, inception_weights: str | Path | None, progress: bool
) -> FeatureNetwork:
    """The feature network :func:`choose_features` picks, built."""
    return choose_features(recipe, train, inception_weights=inception_weights).build(progress=progress)


def evaluate_run(
    run_dir: str | Path,
    *,
    n: int | None = None,
    seed: int = 0,
    overrides: list[str] = (),
    inception_weights: str | Path | None = None,
    progress: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Evaluate a trained run; writes ``RUN/metrics.json`` (and ``RUN/report.html``) and returns the metrics.

    ``overrides`` (``evaluate.*`` and ``sampler.*`` keys only) change how the run is judged, never what it is.
    """
    t0 = time.perf_counter()
    run = Run(run_dir)
    recipe = run.load_config()
    bad = [o for o in overrides if not o.startswith(("evaluate.", "sampler."))]
    if bad:
        raise ValueError(f"evaluate accepts only evaluate.* and sampler.* overrides, not {bad[0]!r}")
    recipe = resolve_recipe(recipe_to_dict(recipe), list(overrides))
    if run.latest_checkpoint() is None:
        raise RunError(
            f"{run.path}: no checkpoint to evaluate (train it first: privdiff train RECIPE --out {run.path})"
        )
    e, n = recipe.evaluate, n or recipe.evaluate.n_samples
    if n < max(2, e.pr_k + 1):
        raise ValueError(f"--n must be at least {max(2, e.pr_k + 1)}")
    from ..core.stages import private_training_set, recipe_dataset, require_test_split
    from ..privacy.budget import load_ledger

    require_test_split(recipe)  # step 4 needs one: refused now, not after the samples and classifiers
    train = private_training_set(run, recipe)  # the training split, or a LoRA run's members: what the ledger describes
    ledger = load_ledger(run, train)
    features = choose_features(
        recipe, train, inception_weights=inception_weights
    )  # a network for these channels exists

    # 1. samples
    images, labels = load_or_draw_samples(run, recipe, train, n=n, seed=seed, progress=progress)
    labelled = labels.size > 0  # an unconditional model's samples have no class: no downstream accuracy
    per_class = min(10, int(np.bincount(labels, minlength=train.num_classes).min())) if labelled else 0
    if per_class:  # the picture next to the numbers: one row per class
        rows = np.concatenate([images[labels == c][:per_class] for c in range(train.num_classes)])
        save_grid(eval_dir(run) / "grid.png", rows, nrow=per_class)
    elif not labelled:
        save_grid(eval_dir(run) / "grid.png", images[:100], nrow=10)
    # 2. features and image metrics against the training split
    net = features.build(progress=progress)
    real_train = cached_features(net, train, limit=e.max_real, seed=seed, progress=progress)
    fake = extract_features(net.module, images, progress=progress, desc="features of the samples")
    metric_kw = dict(kid_subset_size=e.kid_subset_size, kid_subsets=e.kid_subsets, pr_k=e.pr_k, seed=seed)
    metrics = image_metrics(real_train, fake, **metric_kw)
    # 3. classifiers: on the samples, and on the real training split (ceiling, cached by content)
    cls_kw = dict(
        num_classes=train.num_classes, epochs=e.classifier_epochs, lr=e.classifier_lr, holdout=e.holdout, seed=seed
    )
    synthetic_fits = (
        train_classifiers(torch.from_numpy(images), torch.from_numpy(labels), progress=progress, **cls_kw)
        if labelled
        else None
    )
    ceiling_key = content_key(kind="ceiling", data=train.fingerprint, resolution=train.resolution, **cls_kw)
    trained: dict[str, Any] = {}

    def ceiling_fits() -> dict[str, Any]:  # trained once, here, unless a cache entry of them was damaged since
        if "fits" not in trained:
            trained["fits"] = train_classifiers(
                (train.images + 1) / 2, train.labels, progress=progress, source="real training split", **cls_kw
            )
        return trained["fits"]

    if labelled and not (is_cached("ceiling", ceiling_key) and is_cached(CEILING_CNN, ceiling_key, tensors=True)):
        ceiling_fits()
    consistency = None
    if labelled:  # the ceiling's CNN (its weights cached with its scores) on the samples
        real_cnn = SmallCNN(in_channels=train.channels, num_classes=train.num_classes, resolution=train.resolution)
        real_cnn.load_state_dict(
            cached_tensors(CEILING_CNN, ceiling_key, lambda: ceiling_fits()["cnn"].model.state_dict())
        )
        consistency = class_consistency(real_cnn, torch.from_numpy(images), torch.from_numpy(labels))

    # 4. the real test split, read for the first time
    test = recipe_dataset(recipe, split="test")
    test_x = (test.images + 1) / 2
    selection = f"epoch with the best accuracy on {e.holdout:.0%} held-out synthetic samples"
    synthetic = score(synthetic_fits, lambda: (test_x, test.labels), selection=selection) if labelled else None
    ceiling = (
        cached_json(
            "ceiling",
            ceiling_key,
            lambda: score(
                ceiling_fits(),
                lambda: (test_x, test.labels),
                selection=f"epoch with the best accuracy on {e.holdout:.0%} held-out training images",
            ),
        )
        if labelled
        else None
    )
    floor_key = content_key(
        kind="floor",
        network=net.key,
        train=train.fingerprint,
        test=test.fingerprint,
        resolution=train.resolution,
        max_real=e.max_real,
        **metric_kw,
    )
    floor = cached_json(
        "floor",
        floor_key,
        lambda: image_metrics(
            real_train, cached_features(net, test, limit=e.max_real, seed=seed, progress=progress), **metric_kw
        ),
    )

    n_ref, n_test_ref = len(real_train), min(len(test), e.max_real or len(test))
    desc_floor = f"{train.name} train ({n_ref}) vs test ({n_test_ref})"
    for name, entry in metrics.items():
        entry.update(
            real=floor[name]["value"], real_desc=desc_floor, better="lower" if name in ("fid", "kid") else "higher"
        )
        if "std" in floor[name]:
            entry["real_std"] = floor[name]["std"]
    for kind in ("cnn", "logreg") if labelled else ():
        s = synthetic[kind]
        metrics[f"accuracy_{kind}"] = {
            "value": s["accuracy"],
            "real": ceiling[kind]["accuracy"],
            "better": "higher",
            "real_desc": f"the same classifier trained on {train.name} train ({len(train)})",
            "note": f"epoch {s['selected_epoch']} of {s['epochs']}, selected on {e.holdout:.0%} held-out synthetic samples",
        }
    if consistency is not None:
        metrics["class_consistency"] = {
            "value": consistency,
            "real": ceiling["cnn"]["accuracy"],
            "better": "higher",
            "real_desc": f"the same classifier on the real {test.name} test split ({len(test)})",
            "note": f"samples that the CNN trained on {train.name} train ({len(train)}) assigns to their intended "
            "class: a non-private statistic of the private data, like the ceiling",
        }

    log = run.read_train_log()
    result = {
        "schema": SCHEMA,
        "run": str(run.path),
        "method": recipe.method,
        "checkpoint_step": int(run.latest_checkpoint().name.split("-")[-1]),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "privacy": _privacy(ledger),
        "train_time_s": max((float(x.get("time_s", 0)) for x in log), default=None),
        "data": {
            "name": train.name,
            "class_names": list(train.class_names or []),
            "n_train": len(train),
            "n_test": len(test),
            "resolution": train.resolution,
            "fingerprint": train.fingerprint,
        },
        "samples": {
            "n": n,
            "seed": seed,
            "sampler": recipe_to_dict(recipe)["sampler"],
            "labels": "balanced" if labelled else "none (an unconditional model: no downstream accuracy)",
        },
        "features": net.info,
        "reference": f"{train.name} train ({n_ref} images)",
        "metrics": metrics,
        "protocol": {
            "fid_reference": "real training split",
            "selection": selection,
            "test_split_reads": 1,
            "classifier_epochs": e.classifier_epochs,
            "classifier_lr": e.classifier_lr,
            "holdout": e.holdout,
            "kid_subset_size": min(e.kid_subset_size, n, n_ref),
            "kid_subsets": e.kid_subsets,
            "pr_k": e.pr_k,
        },
        "privacy_note": PRIVACY_NOTE,
        "eval_time_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(run.path / "metrics.json", json.dumps(result, indent=2) + "\n")
    if report:
        from .report import write_report

        write_report(run.path)
    return result


def _privacy(ledger: Ledger | None) -> dict[str, Any]:
    if ledger is None:
        return {"private": False, "epsilon": None, "delta": None, "accountant": None, "target_epsilon": None}
    d = ledger.to_dict()
    return {k: d[k] for k in ("private", "epsilon", "delta", "accountant", "target_epsilon")}


def format_metrics(result: dict[str, Any]) -> str:
    """The metrics table as text, each value beside its real-data floor or ceiling."""
    names = {
        "fid": "FID",
        "kid": "KID",
        "precision": "precision",
        "recall": "recall",
        "accuracy_cnn": "accuracy (CNN)",
        "accuracy_logreg": "accuracy (LogReg)",
        "class_consistency": "class consistency",
    }
    rows = [f"{'metric':<18} {'value':>18}   {'real data':>10}"]
    for key, m in result["metrics"].items():
        kind = "floor" if m.get("better") == "lower" else "ceiling"
        value = f"{m['value']:.4f}" + (f" ± {m['std']:.4f}" if "std" in m else "")
        rows.append(f"{names.get(key, key):<18} {value:>18}   {m.get('real', float('nan')):>10.4f} ({kind})")
    p = result["privacy"]
    eps = "non-private" if not p["private"] else f"epsilon={p['epsilon']:.4f}, delta={p['delta']}"
    rows.append(
        f"features: {result['features']['name']} ({result['features'].get('trained_on') or result['features'].get('weights')}); "
        f"{result['samples']['n']} samples vs {result['reference']}; {eps}"
    )
    return "\n".join(rows)


__all__ = [
    "FeatureChoice",
    "choose_features",
    "evaluate_run",
    "format_metrics",
    "load_or_draw_samples",
    "feature_network",
    "PRIVACY_NOTE",
]
