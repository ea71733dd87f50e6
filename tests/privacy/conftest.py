"""A real PostgreSQL server on loopback for the registry tests, started from the system's packages.

Found via ``initdb`` on PATH or in /usr/lib/postgresql/*/bin (``make test`` installs Debian's
``postgresql`` when it can). PostgreSQL refuses to run as root: as root the server runs as the
``postgres`` (or ``nobody``) user. Without the binaries or psycopg the PostgreSQL cases are
skipped with the reason; the SQLite cases always run.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def _pg_bin() -> str | None:
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(cands[-1]) if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """``postgresql://privdiff@127.0.0.1:PORT``: a throwaway server for this test session."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL registry tests skipped: psycopg is not installed (pip install 'privdiff[postgres]')")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip(
            "PostgreSQL registry tests skipped: no initdb (apt-get install postgresql, or run `make test` as root)"
        )
    base = Path(
        tempfile.mkdtemp(prefix="privdiff-pg-")
    )  # not under pytest's root-only tmp tree: the server's user must reach it
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix = []
    if os.geteuid() == 0:  # postgres will not run as root
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None:
            pytest.skip("PostgreSQL registry tests skipped: running as root and no 'postgres' or 'nobody' user")
        uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
        for p in (base, sock):
            os.chown(p, uid, gid)
        prefix = ["runuser", "-u", user, "--"]
    port = _free_port()
    log = data / "server.log"
    run = lambda *cmd: subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run(f"{bindir}/initdb", "-D", str(data), "-U", "privdiff", "-A", "trust", "--no-sync", "-E", "UTF8")
    if r.returncode:
        pytest.skip(f"PostgreSQL registry tests skipped: initdb failed: {r.stderr.strip()[-300:]}")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off"
    r = run(f"{bindir}/pg_ctl", "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
    if r.returncode:
        pytest.skip(
            f"PostgreSQL registry tests skipped: the server did not start: {r.stderr.strip()[-300:]} (see {log})"
        )
    try:
        yield f"postgresql://privdiff@127.0.0.1:{port}"
    finally:
        run(f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    """A fresh, empty registry on each backend (created, as `privdiff budget init` does)."""
    from privdiff.privacy.registry import Registry

    if request.param == "sqlite":
        url = str(tmp_path / "registry.sqlite")
    else:
        server = request.getfixturevalue("postgres_server")
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = f"{server}/{name}"
    Registry(url, create=True).close()
    return url
