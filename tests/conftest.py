import os
import shutil

import pytest
import torch

from tests.helpers import TINY

# Two cores: one torch thread per test process keeps timings sane and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("PRIVDIFF_TEST_THREADS", "2")))


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
    """Every test (and the commands it starts) registers its runs in its own budget registry, with its own
    example key, never ~/.privdiff (a PostgreSQL registry's key would otherwise be ~/.privdiff/example.key)."""
    path = tmp_path_factory.mktemp("registry") / "registry.sqlite"
    shutil.copyfile(_empty_registry, path)
    monkeypatch.setenv("PRIVDIFF_REGISTRY", str(path))
    monkeypatch.setenv("PRIVDIFF_EXAMPLE_KEY_FILE", str(path.parent / "example.key"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Feature networks, real-data features and scores that tests cache go to a session directory, never the
    user's ~/.cache/privdiff (tests/evaluation sets its own the same way)."""
    old = os.environ.get("PRIVDIFF_CACHE")
    os.environ["PRIVDIFF_CACHE"] = str(tmp_path_factory.mktemp("privdiff-cache"))
    yield
    if old is None:
        os.environ.pop("PRIVDIFF_CACHE", None)
    else:
        os.environ["PRIVDIFF_CACHE"] = old


@pytest.fixture
def deterministic_kernels():
    """One per-example convolution kernel, not the fastest one timed anew for every Poisson batch size:
    cheaper on tiny models and runs, the same result (use with ``pytest.mark.usefixtures``)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
