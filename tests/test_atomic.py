"""Atomic writes: temporaries are removed by exact name only; a directory is replaced only once its successor is complete."""

import os
import random
import string

import pytest

from privdiff.atomic import atomic_directory, atomic_write_bytes, remove_temporaries


def _mkstemp_like(name: str, rng: random.Random) -> str:
    """The name tempfile gives a temporary of target ``name``: ``.NAME.XXXXXXXX.tmp``."""
    return f".{name}.{''.join(rng.choices(string.ascii_lowercase + string.digits + '_', k=8))}.tmp"


def test_remove_temporaries_takes_only_the_named_targets_here(tmp_path):
    rng = random.Random()
    ours = [tmp_path / _mkstemp_like(n, rng) for n in ("config.yaml", "ledger.json", "step-000012")]
    (tmp_path / "sub").mkdir()
    users = [
        tmp_path / ".notes.tmp",
        tmp_path / ".config.yaml.tmp",
        tmp_path / _mkstemp_like("notes.txt", rng),
        tmp_path / f".config.yaml.{'x' * 9}.tmp",
        tmp_path / "sub" / _mkstemp_like("config.yaml", rng),
    ]
    for p in ours[:2] + users:
        p.write_text("keep me" if p in users else "")
    ours[2].mkdir()
    (ours[2] / "unet").mkdir()
    removed = remove_temporaries(tmp_path, targets=r"config\.yaml|ledger\.json|step-\d{6}")
    assert sorted(removed) == sorted(ours)
    assert not any(p.exists() for p in ours)
    assert all(p.read_text() == "keep me" for p in users)  # a user's own files, and anything below, stay


def test_atomic_directory_replaces_only_a_complete_directory(tmp_path):
    target = tmp_path / "step-000002"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "a").read_text() == "old"  # the failed replacement left the old one whole
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["step-000002"]  # no temporaries, no old copy aside


def test_a_failed_write_keeps_the_old_content_and_names_the_file(tmp_path):
    """A real file-system limit (RLIMIT_FSIZE, in a child process): the write fails with OSError naming the target."""
    import subprocess
    import sys

    path = tmp_path / "ledger.json"
    old = os.urandom(100)
    path.write_bytes(old)
    code = (
        "import resource, signal, sys\n"
        "from privdiff.atomic import atomic_write_bytes\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        f"    atomic_write_bytes({str(path)!r}, b'x' * 100000)\n"
        "except OSError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert str(path) in res.stdout and len(res.stdout.strip().splitlines()) == 1
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["ledger.json"]  # its temporary is gone
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
