"""Captions for labelled images: "a handwritten digit seven", from templates and class names.

Text-conditioned models need (image, caption) pairs; labelled data sets have labels. privdiff
builds captions from a label with one of a few templates per draw, so the text encoder learns
that different phrasings name the same class. Captions are a function of the label only: they
carry no more private information than the label itself.
"""

from __future__ import annotations

import re

import torch

__all__ = ["TEMPLATES", "caption", "caption_variants", "random_captions", "words"]

TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {}",
    "a handwritten {}",
    "the number {}",
    "a picture of the digit {}",
    "a drawing of a {}",
    "digit {}",
    "{}",
)
"""Caption templates; ``{}`` is the class name ("seven", "t-shirt/top", ...)."""


NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def class_words(class_name: str) -> tuple[str, ...]:
    """The names a caption may use for a class: a digit class "7" is also "seven"."""
    return (
        (NUMBER_WORDS[int(class_name)], class_name) if class_name.isdigit() and len(class_name) == 1 else (class_name,)
    )


def caption_variants(class_name: str) -> list[str]:
    """Every caption of a class: each template with each of its names ("a handwritten digit seven", "the number 7", ...)."""
    return [t.format(name) for name in class_words(class_name) for t in TEMPLATES]


def words(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` (letters and digits; everything else separates)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def caption(class_name: str, variant: int = 0) -> str:
    """Caption number ``variant`` of a class (see :func:`caption_variants`); 0 is "a handwritten digit seven"."""
    variants = caption_variants(class_name)
    return variants[variant % len(variants)]


def random_captions(
    labels: torch.Tensor, class_names: tuple[str, ...], *, generator: torch.Generator | None = None
) -> list[str]:
    """One caption per label (any shape, flattened in order), each variant drawn uniformly."""
    flat = labels.reshape(-1).tolist()
    u = torch.rand(len(flat), generator=generator).tolist()
    return [caption(class_names[y], int(v * len(caption_variants(class_names[y])))) for y, v in zip(flat, u)]
