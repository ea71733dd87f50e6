"""Captions for labelled images: "a handwritten digit seven", from templates and class names.

Text-conditioned models need (image, caption) pairs; labelled data sets have labels. privdiff
builds captions from a label with one of a few templates per draw, so the text encoder learns
that different phrasings name the same class. Captions are a function of the label only: they
carry no more private information than the label itself.
"""

from __future__ import annotations

import re

import torch

__all__ = ["TEMPLATES", "caption", "random_captions", "words"]

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


def words(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` (letters and digits; everything else separates)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def caption(class_name: str, template: int = 0) -> str:
    """The caption of one class with template number ``template``."""
    return TEMPLATES[template % len(TEMPLATES)].format(class_name)


def random_captions(labels: torch.Tensor, class_names: tuple[str, ...], *, generator: torch.Generator | None = None) -> list[str]:
    """One caption per label (any shape, flattened in order), each with a template drawn uniformly."""
    flat = labels.reshape(-1).tolist()
    templates = torch.randint(0, len(TEMPLATES), (len(flat),), generator=generator).tolist()
    return [caption(class_names[y], t) for y, t in zip(flat, templates)]
