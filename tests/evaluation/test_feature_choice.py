"""Which feature network ``privdiff evaluate`` uses, settled before any work: by the data's channels, never by the
downstream classifiers' settings (no network is trained here)."""

from __future__ import annotations

import pytest
import torch

from privdiff.config import resolve_recipe
from privdiff.data import ImageDataset
from privdiff.evaluation.evaluate import FEATURE_EPOCHS, choose_features


def _data(channels: int, resolution: int) -> ImageDataset:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    return ImageDataset(
        images=torch.rand(12, channels, resolution, resolution, generator=g) * 2 - 1,
        labels=torch.randint(0, 3, (12,), generator=g),
        num_classes=3,
        name="folder",
        split="train",
        fingerprint="sha256:" + "ab" * 32,
    )


def test_the_data_decides_the_feature_network_and_classifier_epochs_do_not():
    epochs = int(torch.randint(1, 50, ()))
    recipe = resolve_recipe(
        None, [f"evaluate.classifier_epochs={epochs}", f"evaluate.classifier_lr={1e-3 * (1 + epochs)}"]
    )
    gray, colour = _data(1, 8), _data(3, 16)
    c = choose_features(recipe, gray, inception_weights=None)
    assert (c.kind, c.data.name, c.data.channels, c.data.resolution, c.epochs) == (
        "public",
        "digits",
        1,
        8,
        FEATURE_EPOCHS["public"],
    )
    c = choose_features(recipe, colour, inception_weights=None)  # no colour public set: the public photos
    assert (c.kind, c.data, c.channels, c.resolution, c.epochs, c.patches) == (
        "photos",
        None,
        3,
        16,
        FEATURE_EPOCHS["photos"],
        6000,
    )
    mine = resolve_recipe(
        None, [f"evaluate.feature_epochs={epochs}", "evaluate.feature_patches=64", "evaluate.features=photos"]
    )
    c = choose_features(mine, gray, inception_weights=None)
    assert (c.kind, c.channels, c.epochs, c.patches) == ("photos", 1, epochs, 64)
    c = choose_features(resolve_recipe(None, ["evaluate.features=train"]), colour, inception_weights=None)
    assert c.kind == "train" and c.data is colour


def test_what_no_feature_network_fits_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="evaluate.features=train or give --inception-weights") as e:
        choose_features(resolve_recipe(None), _data(3, 4), inception_weights=None)  # the photos need >= 8 pixels
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="--inception-weights is not a file"):
        choose_features(resolve_recipe(None), _data(3, 16), inception_weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="evaluate.public_data=mnist") as e:
        choose_features(
            resolve_recipe(None, ["evaluate.public_data=mnist", f"evaluate.public_root={tmp_path}"]),
            _data(1, 8),
            inception_weights=None,
        )
    assert "\n" not in str(e.value)
