"""Built-in data sets: mnist5k (fixed stratified split) and sklearn digits."""

from __future__ import annotations

import pytest
import torch

from privdiff.data import load_dataset


@pytest.fixture(scope="module")
def mnist5k_train():
    return load_dataset("mnist5k", split="train")


@pytest.fixture(scope="module")
def mnist5k_test():
    return load_dataset("mnist5k", split="test")


def test_mnist5k_split_sizes_and_balance(mnist5k_train, mnist5k_test):
    assert len(mnist5k_train) == 4000 and len(mnist5k_test) == 1000
    assert mnist5k_train.labels.bincount(minlength=10).tolist() == [400] * 10
    assert mnist5k_test.labels.bincount(minlength=10).tolist() == [100] * 10
    assert mnist5k_train.images.shape == (4000, 1, 28, 28)
    assert (mnist5k_train.channels, mnist5k_train.resolution, mnist5k_train.num_classes) == (1, 28, 10)
    assert mnist5k_train.images.dtype == torch.float32 and mnist5k_train.labels.dtype == torch.int64


def test_mnist5k_train_test_disjoint(mnist5k_train, mnist5k_test):
    train_rows = {row.numpy().tobytes() for row in mnist5k_train.images.flatten(1)}
    test_rows = {row.numpy().tobytes() for row in mnist5k_test.images.flatten(1)}
    assert not train_rows & test_rows


def test_mnist5k_value_range(mnist5k_train):
    assert mnist5k_train.images.min().item() == -1.0
    assert mnist5k_train.images.max().item() == 1.0
    # x / 127.5 - 1 of uint8 values: every value maps back to an integer pixel.
    pixels = (mnist5k_train.images + 1) * 127.5
    torch.testing.assert_close(pixels, pixels.round(), rtol=0, atol=1e-4)


def test_mnist5k_fingerprint_stable_and_split_specific(mnist5k_train, mnist5k_test):
    again = load_dataset("mnist5k", split="train")
    assert again.fingerprint == mnist5k_train.fingerprint
    assert torch.equal(again.images, mnist5k_train.images) and torch.equal(again.labels, mnist5k_train.labels)
    assert mnist5k_train.fingerprint != mnist5k_test.fingerprint
    assert mnist5k_train.fingerprint.startswith("sha256:") and len(mnist5k_train.fingerprint) == 7 + 64


def test_mnist5k_all_and_resize():
    full = load_dataset("mnist5k", split="all", resolution=32)
    assert full.images.shape == (5000, 1, 32, 32)
    assert full.split == "all"
    assert full.images.min() >= -1 and full.images.max() <= 1


def test_digits_at_28():
    ds = load_dataset("digits", resolution=28)
    assert ds.images.shape == (1437, 1, 28, 28)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.images.min().item() == -1.0  # blank borders stay exactly -1
    native = load_dataset("digits", split="all")
    assert native.images.shape == (1797, 1, 8, 8) and native.resolution == 8
    assert native.images.max().item() == 1.0  # 16 -> 255 -> 1
    # Resizing happens after fingerprinting: same source content, same fingerprint.
    assert ds.fingerprint == load_dataset("digits", split="train").fingerprint


def test_digits_split_stratified_and_disjoint():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    assert len(train) == 1437 and len(test) == 360
    assert (test.labels.bincount(minlength=10) >= 35).all()
    train_rows = {row.numpy().tobytes() for row in train.images.flatten(1)}
    # Digits has a few duplicate images; the split is by index, so just check sizes add up.
    assert len(train) + len(test) == len(load_dataset("digits", split="all"))
    assert len(train_rows) > 1400
