import hashlib
import math

import pytest
import torch

from privdiff.evaluation.inception import (
    FIDInceptionV3,
    InceptionWeightsError,
    load_fid_inception,
    weights_sha256,
)


def random_state_dict(model: FIDInceptionV3, seed: int) -> dict[str, torch.Tensor]:
    """Random non-zero weights and BN statistics, He-scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        shape = value.shape
        if key.endswith("num_batches_tracked"):
            state[key] = value.clone()
        elif key.endswith("conv.weight"):
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2 / value[0].numel())
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(("bn.bias", "running_mean")):
            state[key] = 0.2 * torch.randn(shape, generator=g)
        else:  # fc
            state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model with random weights, path of its saved state dict)."""
    model = FIDInceptionV3()
    model.load_state_dict(random_state_dict(model, seed=20240611))
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_roundtrip_gives_identical_features(saved):
    model, path = saved
    loaded = load_fid_inception(path)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 1, 16, 16), (2, 3, 32, 32)]:
        x = torch.rand(shape, generator=g)
        with torch.no_grad():
            expected, got = model(x), loaded(x)
        assert got.shape == (shape[0], 2048) and got.dtype == torch.float32
        assert torch.isfinite(got).all() and got.abs().max() > 0
        assert torch.equal(got, expected)


def test_gray_equals_repeated_rgb(saved):
    model, _ = saved
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(x), model(x.repeat(1, 3, 1, 1)))


def test_file_without_num_batches_tracked_loads(saved, tmp_path):
    # The converted TF weights file has no *.num_batches_tracked entries.
    model, _ = saved
    path = tmp_path / "no_nbt.pth"
    torch.save({k: v for k, v in model.state_dict().items() if "num_batches" not in k}, path)
    loaded = load_fid_inception(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def _bad_state(model: FIDInceptionV3, kind: str) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if kind == "missing":
        del state["Mixed_6b.branch7x7_2.conv.weight"]
    elif kind == "unexpected":
        state["aux.weight"] = torch.ones(1)
    elif kind == "shape":
        state["fc.bias"] = torch.ones(1000)
    return state


@pytest.mark.parametrize(
    "kind,fragment",
    [
        ("missing", "Mixed_6b.branch7x7_2.conv.weight"),
        ("unexpected", "aux.weight"),
        ("shape", "fc.bias"),
        ("absent", "not found"),
        ("garbage", "cannot read"),
        ("not_a_state_dict", "not a state dict"),
    ],
)
def test_bad_files_raise(saved, tmp_path, kind, fragment):
    model, _ = saved
    path = tmp_path / f"weights-{kind}.pth"
    if kind in ("missing", "unexpected", "shape"):
        torch.save(_bad_state(model, kind), path)
    elif kind == "garbage":
        path.write_bytes(b"this is not a torch file")
    elif kind == "not_a_state_dict":
        torch.save([torch.ones(2)], path)
    with pytest.raises(InceptionWeightsError) as info:
        load_fid_inception(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert path.name in message and fragment in message and "\n" not in message


def test_rejects_bad_input(saved):
    model, _ = saved
    with pytest.raises(TypeError):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 2, 8, 8))


def test_weights_sha256(saved):
    _, path = saved
    assert weights_sha256(path) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_torchmetrics_fid(saved):
    from torchmetrics.image.fid import FrechetInceptionDistance

    _, path = saved
    model = load_fid_inception(path)
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)

    fid = FrechetInceptionDistance(feature=model, normalize=True)
    fid.train()  # a parent switching to training must not unfreeze BatchNorm
    assert not model.training
    fid.update(a, real=True)
    fid.update(b, real=False)
    value = fid.compute().item()
    assert math.isfinite(value) and value >= 0

    fid.reset()
    fid.update(a, real=True)
    fid.update(a, real=False)
    assert abs(fid.compute().item()) < 1e-2 * max(1.0, value)
