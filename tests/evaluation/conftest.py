import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def privdiff_cache(tmp_path_factory):
    """One fresh cache for the evaluation tests: feature CNNs are trained once per session, never read from ~/.cache."""
    path = tmp_path_factory.mktemp("privdiff-cache")
    old = os.environ.get("PRIVDIFF_CACHE")
    os.environ["PRIVDIFF_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PRIVDIFF_CACHE", None)
    else:
        os.environ["PRIVDIFF_CACHE"] = old
