import os
import shutil

import pytest
import torch

# Two cores: one torch thread per test process keeps timings sane and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("PRIVDIFF_TEST_THREADS", "2")))

TINY = [
    "model.channels=[8,16]",
    "model.attention_levels=[1]",
    "model.norm_num_groups=4",
    "model.attention_head_dim=4",
    "data.resolution=8",
    "train.batch_size=32",
    "train.epochs=1",
    "privacy.noise_multiplicity=2",
    "train.max_physical_batch_size=32",
    "sampler.steps=4",
]


@pytest.fixture
def tiny_overrides():
    """Overrides that make any recipe a seconds-long smoke run on 8x8 images."""
    return list(TINY)


@pytest.fixture(scope="session")
def _empty_registry(tmp_path_factory):
    """One empty budget registry, copied for each test (a given registry must exist: `privdiff budget init`)."""
    from privdiff.privacy.registry import Registry

    path = tmp_path_factory.mktemp("registry-template") / "registry.sqlite"
    Registry(path, create=True).close()
    return path


@pytest.fixture(autouse=True)
def _private_budget_registry(tmp_path_factory, monkeypatch, _empty_registry):
    """Every test (and the commands it starts) registers its runs in its own budget registry, never ~/.privdiff."""
    path = tmp_path_factory.mktemp("registry") / "registry.sqlite"
    shutil.copyfile(_empty_registry, path)
    monkeypatch.setenv("PRIVDIFF_REGISTRY", str(path))


@pytest.fixture
def deterministic_kernels():
    """One per-example convolution kernel, not the fastest one timed anew for every Poisson batch size:
    cheaper on tiny models and runs, the same result (use with ``pytest.mark.usefixtures``)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
