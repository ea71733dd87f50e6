"""Downstream accuracy, the DP-safe way: train on synthetic data, select on synthetic data, test on real once.

DPImageBench's first fair-comparison rule: choosing a classifier's epoch or settings on the real
test set both breaks DP and overstates utility. Here the epoch is chosen on a held-out part of
the data the classifier is trained on (synthetic samples, or, for the real-data ceiling, the real
training split), and the test split is asked for, through a callable, only after every
classifier has been trained and selected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .classifiers import CLASSIFIERS, FitResult, accuracy, fit_classifier

TestSplit = Callable[[], tuple[Tensor, Tensor]]  # () -> (images in [0, 1], labels), called once, last


def train_classifiers(
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    kinds: tuple[str, ...] = tuple(CLASSIFIERS),
    epochs: int = 30,
    lr: float = 1e-3,
    holdout: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    source: str = "synthetic",
) -> dict[str, FitResult]:
    """One classifier of each ``kind`` trained on ``(x, y)``, its epoch selected on a held-out ``holdout`` of them."""
    return {
        kind: fit_classifier(
            kind,
            x,
            y,
            num_classes=num_classes,
            holdout=holdout,
            epochs=epochs,
            lr=lr,
            seed=seed,
            progress=progress,
            desc=f"{kind} on {source}",
        )
        for kind in kinds
    }


def score(fits: dict[str, FitResult], test: TestSplit, *, selection: str) -> dict[str, dict[str, Any]]:
    """Real test accuracy of each selected classifier; the test split is read here, once."""
    x_test, y_test = test()
    return {
        kind: {
            "accuracy": accuracy(fit.model, x_test, y_test),
            "selected_epoch": fit.selected_epoch,
            "epochs": fit.epochs,
            "held_out_accuracy": fit.val_accuracy,
            "selection": selection,
        }
        for kind, fit in fits.items()
    }


def downstream_accuracy(
    x: Tensor,
    y: Tensor,
    *,
    test: TestSplit,
    holdout: float = 0.1,
    source: str = "synthetic",
    **train_options: Any,
) -> dict[str, dict[str, Any]]:
    """Train every classifier on ``(x, y)`` (selected on held-out ``source`` data), then test on the real test split.

    ``train_options`` are those of :func:`train_classifiers` (``num_classes``, ``kinds``, ``epochs``, ...).
    """
    fits = train_classifiers(x, y, holdout=holdout, source=source, **train_options)
    return score(fits, test, selection=f"epoch with the best accuracy on {holdout:.0%} held-out {source} data")


def class_consistency(classifier: nn.Module, images: Tensor, labels: Tensor) -> float | None:
    """Fraction of ``images`` (in [0, 1]) that ``classifier`` assigns to their intended class ``labels``.

    With the real-data classifier of the ceiling, this says how often a conditional model draws the class
    it was asked for. It is a non-private statistic of the private data (the classifier was trained on it),
    like the ceiling. None for unlabelled samples (an unconditional model has no intended class).
    """
    if labels.numel() == 0:
        return None
    if len(images) != len(labels):
        raise ValueError(f"class_consistency: {len(images)} images but {len(labels)} labels")
    return accuracy(classifier, images, labels)
