"""The budget registry: every run that touches a data set, and the ε they compose to together.

A run's ledger composes the releases of one run. Tuning runs on the same data compose too: ten
runs at ε = 1 each are not an ε = 1 data set. The registry keeps, per data set, the events of
every run and composes all of them with the accountant (:func:`privdiff.privacy.accounting.epsilon`
over the union of their ``(σ, q, steps)``, at the data set's δ). A data set may have a cap:

1. **admit** (before the run reads any data): the run's *planned* events are reserved; the
   composed total of every run's charge plus this plan must stay within the cap, or the run is
   refused (:class:`BudgetExceeded`).
2. **record** (write-ahead, with every ledger save): the run's executed events replace its
   previous record (one row per event, primary key ``(run_id, seq)``: a replayed or resumed step
   can never be counted twice), checked against the cap again.

A run's charge is, per stage, the larger of what it planned and what it recorded: a run killed
half-way keeps its reservation (it may be resumed); a non-private run's charge is ε = ∞.

3. **release** (``privdiff budget release``, for a run abandoned after a crash): the run's
   reservation is dropped and its charge becomes exactly what it executed — its recorded events,
   or its ledger's if that counts more (spent steps are never released). Resuming a released run
   admits it again: its plan is reserved anew, under the cap.

Backends, one interface: SQLite (a file; the default ``~/.privdiff/registry.sqlite``, or
``$PRIVDIFF_REGISTRY``) and PostgreSQL (``postgresql://...``, psycopg 3) for teams. A registry is
created only on request (``Registry(url, create=True)``, ``privdiff budget init``), or at the default
location when none is given: a given location that holds no registry (a typo, a missing directory,
an empty file), an unknown scheme, a directory, a file that is not a registry and a refused
connection are :class:`RegistryError` errors, so a misspelt registry can never be a fresh one without
caps. Concurrent runs
are serialised by the database: SQLite by ``BEGIN IMMEDIATE`` (one writer at a time, taken before
the total is read), PostgreSQL by ``SELECT ... FOR UPDATE`` on the data set's row, so two runs can
never both see room for themselves under the cap.

Data sets are keyed by ``HMAC-SHA256(registry key, content fingerprint)``, the key being a random
secret created with the registry: its identifiers are not a content hash that anyone holding a
candidate data set could test, and shown names stay the user's.

**Identity that follows the data, not its file format.** A fingerprint names one file set, name and
split: the same images as IDX files, a PNG folder, a zip of it or the built-in array, or a subset of
them, have other fingerprints. So the registry also knows each run's *examples*:

* What is hashed: each example's canonical pixels, as decoded to uint8 before any resizing, a
  colour image with three equal channels taken as gray, and nothing else (not the label, file name,
  class folder or position): :func:`privdiff.data.dataset.example_digests` gives their SHA-256,
  and the registry stores ``HMAC-SHA256(example key, that digest)`` per example (``examples`` table).
  So an IDX file, a PNG folder, a zip and the built-in copy of the same images have the same
  examples; a lossy re-encode (JPEG), a crop, a resize or any changed pixel does not, and is not
  recognised (a limit of exact identity). Pixels are decoded by Pillow; a lossy format may decode
  differently under another Pillow/libjpeg.
* The example key: 32 random bytes in a file on the data holder's machine, mode 0600, created on
  first use: ``$PRIVDIFF_EXAMPLE_KEY_FILE``, else beside a SQLite registry (``registry.sqlite.key``),
  else (PostgreSQL) ``~/.privdiff/example.key``. It is never in the database, a run directory or a
  ledger. The registry keeps only ``HMAC(key, constant)`` (``meta.example_key_check``), so a
  machine with another key, or none, is refused (:class:`RegistryError`) instead of silently seeing
  every example as new: a team sharing a PostgreSQL registry shares one key file.
* The composition rule: a data set is a union-find of overlapping example sets. When a run is
  admitted (or a data set capped or named), every data set that holds one of its examples, or its
  fingerprint, is *merged* into one (``datasets.merged_into`` points at the surviving root); the run
  is charged to the merged data set, whose committed ε composes every run of every member and is
  checked against its cap. A merge keeps the strictest terms: the smallest cap, the smallest δ (ε
  only grows as δ shrinks), and ``rdp`` when the accountants differ. A refused run merges nothing
  (the transaction is rolled back). Disjoint data stays separate. Composing all runs of a merged
  data set over-counts for examples that only some runs touched; that is conservative (an example's
  true ε is that of the runs containing it, never more), never weaker. Runs stay attached to their
  fingerprint's row, so a registry used by an older privdiff keeps its per-fingerprint caps and runs.
* What leaks. The ledger (published with a model) gets ``dataset.examples``, a keyed digest of the
  run's example set: without the key it tells nothing of the content; two ledgers with the same value
  used the same examples (as equal fingerprints already tell). The database (without the key file)
  holds keyed per-example hashes: how many examples each data set has and which runs and data sets
  share examples, nothing of any pixel. The database *with* the key file lets its holder test whether
  a candidate image is in a registered data set (membership): the key is as sensitive as the data
  and stays with it.
* Migration: registries of an older privdiff gain the ``examples`` table and the ``merged_into`` and
  ``label`` columns when opened; their data sets, caps and runs are unchanged. Their runs recorded no
  examples: a run or ``privdiff budget cap``/``name`` on the same data (same fingerprint) attaches
  them, after which re-exports and subsets of it compose with it.

A data set can be given a name (``privdiff budget name RECIPE NAME``: :meth:`Registry.name_dataset`);
``budget status`` shows it, and every source it merged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .accounting import ACCOUNTANTS
from .accounting import epsilon as compose_epsilon
from .events import Release

DEFAULT_PATH = Path("~/.privdiff/registry.sqlite")
KEY_ENV = "PRIVDIFF_EXAMPLE_KEY_FILE"
DEFAULT_KEY_PATH = Path(
    "~/.privdiff/example.key"
)  # a PostgreSQL registry's example key, unless $PRIVDIFF_EXAMPLE_KEY_FILE
_KEY_CHECK = b"privdiff example key check v1"
_CHUNK = 500  # hashes per IN (...) query: under SQLite's limit on bound parameters
_PG_LOCK = 7_243_301_550_102_231  # the advisory lock every PostgreSQL transaction of the registry takes

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS datasets (
        key TEXT PRIMARY KEY, name TEXT NOT NULL, size BIGINT, cap_epsilon DOUBLE PRECISION,
        delta DOUBLE PRECISION NOT NULL, accountant TEXT NOT NULL, merged_into TEXT, label TEXT)""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY, dataset_key TEXT NOT NULL REFERENCES datasets(key), path TEXT,
        planned TEXT NOT NULL, target_epsilon DOUBLE PRECISION, delta DOUBLE PRECISION, accountant TEXT,
        created TEXT NOT NULL, updated TEXT NOT NULL, released TEXT)""",
    """CREATE TABLE IF NOT EXISTS events (
        run_id TEXT NOT NULL REFERENCES runs(run_id), seq BIGINT NOT NULL, stage TEXT NOT NULL, mechanism TEXT NOT NULL,
        noise_multiplier DOUBLE PRECISION NOT NULL, sample_rate DOUBLE PRECISION NOT NULL, steps BIGINT NOT NULL,
        PRIMARY KEY (run_id, seq))""",
    """CREATE TABLE IF NOT EXISTS examples (
        hash TEXT PRIMARY KEY, dataset_key TEXT NOT NULL REFERENCES datasets(key))""",
]


class BudgetExceeded(ValueError):
    """A run would take its data set's composed ε past the cap: refused, nothing recorded."""


def _triples(events: list[Release]) -> list[tuple[float, float, int]]:
    return [e.triple for e in events]


def _steps_by_stage(events: list[Release]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[e.stage] = out.get(e.stage, 0) + e.steps
    return out


def _covers(a: list[Release], b: list[Release]) -> bool:
    """``a`` counts at least as many steps as ``b`` in every stage of ``b``."""
    sa = _steps_by_stage(a)
    return all(sa.get(stage, 0) >= n for stage, n in _steps_by_stage(b).items())


def charge(planned: list[Release], recorded: list[Release]) -> list[Release]:
    """What a run counts against its data set: its recorded events, plus the planned steps of each
    stage it has not recorded yet (reserved)."""
    out = list(recorded)
    for p in planned:
        done = sum(e.steps for e in recorded if e.stage == p.stage)
        if p.steps > done:
            out.append(p.with_steps(p.steps - done))
    return out


@dataclass
class RunEntry:
    run_id: str
    path: str | None
    planned: list[Release]
    events: list[Release]
    delta: float
    accountant: str
    created: str
    released: str | None = None  # when its reservation was released (``privdiff budget release``)

    def epsilon(self, *, delta: float | None = None, accountant: str | None = None) -> float:
        """ε of this run's recorded events alone."""
        return compose_epsilon(
            _triples(self.events), delta=delta or self.delta, accountant=accountant or self.accountant
        )

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.events)

    @property
    def charged(self) -> list[Release]:
        """What the run counts against its data set: recorded + reserved, or (released) recorded only."""
        return list(self.events) if self.released else charge(self.planned, self.events)

    @property
    def reserved(self) -> list[Release]:
        """The planned steps it has not executed and still holds."""
        return self.charged[len(self.events) :]

    @property
    def complete(self) -> bool:
        return not charge(self.planned, self.events)[len(self.events) :]

    @property
    def state(self) -> str:
        return "complete" if self.complete else "released" if self.released else "reserved"


@dataclass
class DatasetStatus:
    key: str
    name: str
    size: int | None
    cap_epsilon: float | None
    delta: float
    accountant: str
    runs: list[RunEntry] = field(default_factory=list)
    label: str | None = None  # the name given with ``privdiff budget name``
    sources: list[str] = field(default_factory=list)  # the names of every data set merged into this one

    @property
    def display_name(self) -> str:
        """The given name, else the data set's own."""
        return self.label or self.name

    @property
    def spent(self) -> float:
        """ε of every run's recorded events, composed by the accountant."""
        return compose_epsilon(
            [t for r in self.runs for t in _triples(r.events)], delta=self.delta, accountant=self.accountant
        )

    @property
    def committed(self) -> float:
        """ε of every run's charge (recorded + still reserved): what the cap is checked against."""
        return compose_epsilon(
            [t for r in self.runs for t in _triples(r.charged)], delta=self.delta, accountant=self.accountant
        )


def _check_delta_accountant(delta: Any, accountant: Any) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def _check_events(events: list[Release], what: str) -> None:
    """Every event a :class:`~privdiff.privacy.events.Release` (which checks its own ranges: σ >= 0 finite,
    q in [0, 1], steps an integer >= 0, a stage), so the accountant can compose it."""
    for e in events:
        if not isinstance(e, Release):
            raise ValueError(f"a {what} event is not a Release: {e!r}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RegistryError(ValueError):
    """A budget registry that cannot be used: not there (and not asked to be created), an unknown scheme,
    a path that is not a registry, a server that refuses the connection, a database error."""


SCHEMES = {"postgresql": "postgresql", "postgres": "postgresql", "sqlite": "sqlite"}  # scheme -> backend
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def resolve_location(url: str | os.PathLike | None = None) -> tuple[str, bool]:
    """``(location, given)``: ``url``, else ``$PRIVDIFF_REGISTRY``, else privdiff's default file; ``given`` is
    False only for the default. Checks the form (no I/O): an empty location or an unknown scheme is a
    :class:`RegistryError`. PostgreSQL URLs come back as ``postgresql://...``."""
    if url is not None:
        url, source = os.fspath(url), "--registry"
    elif "PRIVDIFF_REGISTRY" in os.environ:
        url, source = os.environ["PRIVDIFF_REGISTRY"], "$PRIVDIFF_REGISTRY"
    else:
        return str(DEFAULT_PATH), False
    url = str(url)
    if not url.strip():
        raise RegistryError(f"the budget registry location ({source}) is empty: give a SQLite file or postgresql://...")
    m = _SCHEME.match(url)
    if m:
        scheme = m.group(1).lower()
        if scheme not in SCHEMES:
            raise RegistryError(
                f"unknown budget registry scheme '{m.group(1)}://' ({source}): give a SQLite file path, "
                "sqlite:///PATH, or postgresql://..."
            )
        if SCHEMES[scheme] == "postgresql":
            return "postgresql://" + url[m.end() :], True
        if not url[m.end() :].startswith("/"):
            raise RegistryError(
                f"a SQLite registry URL is sqlite:///PATH (three slashes), got {_redact(url)!r} ({source})"
            )
    return url, True


def _redact(url: str) -> str:
    """A PostgreSQL URL without user and password; a path as it is."""
    if not url.startswith("postgresql://"):
        return url
    return "postgresql://" + url[len("postgresql://") :].rsplit("@", 1)[-1]


def _scrub(message: str, url: str) -> str:
    """``message`` (a driver's) without the URL's password, on one line."""
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    if password:
        message = message.replace(password, "***").replace(urllib.parse.quote(password, safe=""), "***")
    return " ".join(message.split()) or "no reason given"


def _sqlite_path(url: str) -> Path:
    return Path(url[len("sqlite:///") :] if url.lower().startswith("sqlite:///") else url).expanduser()


def _connect_sqlite(path: Path, *, create: bool) -> sqlite3.Connection:
    """A connection to the SQLite registry file ``path``; it must exist unless ``create``."""
    if path.is_dir():
        raise RegistryError(
            f"{path} is a directory, not a budget registry (a registry is a SQLite file, "
            f"e.g. {path / 'registry.sqlite'})"
        )
    if not path.exists():
        if not create:
            missing_dir = "" if path.parent.is_dir() else f" (the directory {path.parent} does not exist either)"
            raise RegistryError(
                f"no budget registry at {path}{missing_dir}: check the path (a misspelt registry would "
                f"have no caps), or create one with: privdiff budget init --registry {path}"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"cannot create the budget registry {path}: {e.strerror or e}") from None
    try:
        # autocommit mode: transactions are the explicit BEGIN IMMEDIATE ... COMMIT of Registry._transaction;
        # mode=rw never creates the file (an existing registry is opened, nothing else)
        conn = sqlite3.connect(
            f"{path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}",
            uri=True,
            timeout=60,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as e:
        raise RegistryError(f"cannot open the budget registry {path}: {e}") from None
    try:
        # read before anything is written: a file that is not a registry is left exactly as it was
        is_registry = bool(
            conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchall()
        )
        if not is_registry and not create:
            conn.close()
            raise RegistryError(
                f"{path} is not a privdiff budget registry (it holds no registry tables): check the "
                f"location, or make it one with: privdiff budget init --registry {path}"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as e:
        conn.close()
        what = (
            "not a budget registry (not a SQLite database)"
            if isinstance(e, sqlite3.DatabaseError) and "not a database" in str(e)
            else f"cannot be opened ({e})"
        )
        raise RegistryError(f"{path}: {what}") from None
    return conn


def _connect_postgresql(url: str):
    try:
        import psycopg
    except ImportError:
        raise RegistryError("a PostgreSQL registry needs psycopg: pip install 'privdiff[postgres]'") from None
    timeout = {} if "connect_timeout" in url else {"connect_timeout": 30}
    try:
        return psycopg.connect(url, autocommit=True, **timeout)
    except psycopg.Error as e:
        raise RegistryError(f"cannot connect to the budget registry {_redact(url)}: {_scrub(str(e), url)}") from None


@contextlib.contextmanager
def _database_errors(where: str, url: str) -> Iterator[None]:
    """sqlite3 / psycopg errors as :class:`RegistryError` (one line), the registry's own errors unchanged."""
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    try:
        import psycopg

        errors += (psycopg.Error,)
    except ImportError:
        pass
    try:
        yield
    except errors as e:
        raise RegistryError(f"budget registry {where}: {type(e).__name__}: {_scrub(str(e), url)}") from None


def _read_key(path: Path) -> bytes:
    """The example key in ``path`` (64 hex digits), which only its owner may read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as e:
        raise RegistryError(f"cannot read the example key {path}: {e.strerror or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RegistryError(
            f"the example key {path} can be read by other users (mode {stat.S_IMODE(mode):o}): chmod 600 {path}"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise RegistryError(f"{path} is not a privdiff example key (64 hex digits)")
    return bytes.fromhex(text)


def _create_key(path: Path) -> bytes:
    """A new random example key in ``path`` (mode 0600, written whole before it appears: another process
    creating one at the same time gets the same key)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # never replaces a key that is there
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise RegistryError(f"cannot create the example key {path}: {e.strerror or e}") from None
    return _read_key(path)


class Registry:
    """A budget registry at ``url``: a file path (SQLite) or ``postgresql://...`` (PostgreSQL)."""

    def __init__(self, url: str | os.PathLike | None = None, *, create: bool = False):
        """Open the registry at ``url`` (default: ``$PRIVDIFF_REGISTRY``, else ``~/.privdiff/registry.sqlite``).

        A registry that does not exist is created only when ``create`` is set (``privdiff budget init``),
        or at privdiff's own default location when no location is given at all: a location that was
        given and holds no registry (a typo) is refused, never silently replaced by a fresh registry
        without caps. An unknown scheme, a path that is a directory or not a registry, and a server
        that refuses the connection are :class:`RegistryError` errors (one line, no password).
        """
        url, given = resolve_location(url)
        create = create or not given
        self.url, self.created = url, False
        self._xkey: bytes | None = None  # the example key, read on first use (:meth:`_example_key`)
        if url.startswith("postgresql://"):
            self.backend = "postgresql"
            self._conn = _connect_postgresql(url)
            where = self.display
        else:
            self.backend = "sqlite"
            path = _sqlite_path(url)
            self._conn = _connect_sqlite(path, create=create)
            where = str(path)
        try:
            with self._transaction() as db:
                exists = self._has_schema(db)
                if not exists and not create:
                    raise RegistryError(
                        f"{where} is not a privdiff budget registry (it holds no registry tables): check "
                        f"the location, or make it one with: privdiff budget init --registry {where}"
                    )
                for stmt in SCHEMA:
                    db(stmt)
                self._migrate(db)
                db(
                    "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                    ("hmac_key", secrets.token_hex(32)),
                )
                self._key = bytes.fromhex(db("SELECT value FROM meta WHERE name = ?", ("hmac_key",))[0][0])
                self.created = not exists
        except BaseException:
            self._conn.close()
            raise

    @property
    def display(self) -> str:
        """The location, as it may be shown (a PostgreSQL URL without its user and password)."""
        return _redact(self.url)

    def _has_schema(self, db) -> bool:
        if self.backend == "sqlite":
            tables = db("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
        else:
            tables = db(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                "AND table_name = 'meta'"
            )
        return bool(tables) and bool(db("SELECT value FROM meta WHERE name = ?", ("hmac_key",)))

    def close(self) -> None:
        self._conn.close()

    def __repr__(self) -> str:
        return f"Registry({self.backend}: {self.display})"  # never the password

    def _migrate(self, db) -> None:
        """Bring a registry created by an older privdiff up to the current schema (columns added since)."""
        columns = self._columns(db, "runs")
        if "released" not in columns:
            db("ALTER TABLE runs ADD COLUMN released TEXT")
        for column in {"merged_into", "label"} - self._columns(db, "datasets"):
            db(f"ALTER TABLE datasets ADD COLUMN {column} TEXT")

    def _columns(self, db, table: str) -> set[str]:
        if self.backend == "sqlite":
            return {row[1] for row in db(f"PRAGMA table_info({table})")}
        return {
            row[0]
            for row in db(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ?",
                (table,),
            )
        }

    # -- transactions ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator:
        """One serialised transaction; yields ``db(sql, params) -> rows`` (SQL with ``?`` placeholders).

        A database error (locked past the timeout, a full disk, a lost server) is a :class:`RegistryError`."""
        with _database_errors(self.display, self.url):
            if self.backend == "sqlite":
                conn = self._conn
                conn.execute("BEGIN IMMEDIATE")  # the write lock, before anything is read

                def db(sql: str, params: tuple = ()) -> list[tuple]:
                    return conn.execute(sql, params).fetchall()

                db.many = lambda sql, rows: conn.executemany(sql, rows)
                try:
                    yield db
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            else:
                with self._conn.transaction(), self._conn.cursor() as cur:

                    def db(sql: str, params: tuple = ()) -> list[tuple]:
                        cur.execute(sql.replace("?", "%s"), params)
                        return cur.fetchall() if cur.description else []

                    db.many = lambda sql, rows: cur.executemany(sql.replace("?", "%s"), rows)
                    # one writer at a time, as SQLite's BEGIN IMMEDIATE: two runs on overlapping new examples
                    # could otherwise each found a data set of their own and never compose
                    db("SELECT pg_advisory_xact_lock(?)", (_PG_LOCK,))
                    yield db

    def _lock_dataset(self, db, key: str) -> None:
        """Serialise every writer of one data set (PostgreSQL: row lock; SQLite: BEGIN IMMEDIATE already did)."""
        if self.backend == "postgresql":
            db("SELECT key FROM datasets WHERE key = ? FOR UPDATE", (key,))

    # -- identity -------------------------------------------------------------------------------
    def dataset_key(self, fingerprint: str) -> str:
        """HMAC-SHA256 of a data set's content fingerprint under this registry's secret key."""
        return "hmac-sha256:" + hmac.new(self._key, fingerprint.encode(), hashlib.sha256).hexdigest()

    @property
    def example_key_path(self) -> Path:
        """Where this machine keeps the example key: ``$PRIVDIFF_EXAMPLE_KEY_FILE``, else beside a SQLite
        registry (``registry.sqlite.key``), else ``~/.privdiff/example.key``."""
        if os.environ.get(KEY_ENV):
            return Path(os.environ[KEY_ENV]).expanduser()
        if self.backend == "sqlite":
            path = _sqlite_path(self.url)
            return path.with_name(path.name + ".key")
        return DEFAULT_KEY_PATH.expanduser()

    def _example_key(self) -> bytes:
        """The example key (read once), checked against the registry's ``example_key_check``; created (0600)
        when neither the file nor the check exists yet. A missing or different key is a :class:`RegistryError`:
        with a new key every example would look new and start a fresh budget."""
        if self._xkey is not None:
            return self._xkey
        path = self.example_key_path
        with self._transaction() as db:
            rows = db("SELECT value FROM meta WHERE name = ?", ("example_key_check",))
            if path.exists():
                key = _read_key(path)
            elif rows:
                raise RegistryError(
                    f"the example key of the budget registry {self.display} is not on this machine ({path} is "
                    f"missing): copy its key file there, or point ${KEY_ENV} at it (a new key would make every "
                    "example look new, with a fresh budget)"
                )
            else:
                key = _create_key(path)
            check = hmac.new(key, _KEY_CHECK, hashlib.sha256).hexdigest()
            if rows and not hmac.compare_digest(rows[0][0], check):
                raise RegistryError(
                    f"{path} is not the example key of the budget registry {self.display}: use the key file it "
                    f"was made with (${KEY_ENV}), or every example would look new"
                )
            if not rows:
                db("INSERT INTO meta (name, value) VALUES (?, ?)", ("example_key_check", check))
        self._xkey = key
        return key

    def key_examples(self, digests: np.ndarray) -> list[str]:
        """The keyed identities (``HMAC-SHA256(example key, digest)``, hex; sorted, duplicates once) of a data
        set's examples, from their :func:`~privdiff.data.dataset.example_digests` (uint8 ``[N, 32]``)."""
        digests = np.asarray(digests)
        if digests.dtype != np.uint8 or digests.ndim != 2 or digests.shape[1] != 32:
            raise ValueError(f"example digests must be uint8 [N, 32], got {digests.dtype} {digests.shape}")
        key = self._example_key()
        return sorted({hmac.new(key, row.tobytes(), hashlib.sha256).hexdigest() for row in digests})

    def examples_digest(self, examples: list[str]) -> str:
        """One keyed digest of a set of keyed examples: what a ledger records of its examples (never the hashes)."""
        body = b"privdiff example set v1\n" + "\n".join(sorted(set(examples))).encode()
        return "hmac-sha256:" + hmac.new(self._example_key(), body, hashlib.sha256).hexdigest()

    @staticmethod
    def _roots(db) -> dict[str, str]:
        """Every data set's key -> the key of the merged data set it belongs to (its union-find root)."""
        parent = {k: m for k, m in db("SELECT key, merged_into FROM datasets")}

        def find(k: str) -> str:
            for _ in range(len(parent) + 1):
                if not parent.get(k):
                    return k
                k = parent[k]
            raise RegistryError("budget registry: a cycle of merged data sets (the database was edited)")

        return {k: find(k) for k in parent}

    def _resolve(
        self, db, dataset: dict[str, Any], examples: list[str] | None, *, delta: float, accountant: str
    ) -> tuple[str, str]:
        """``(fingerprint key, merged data set)``: the data set row of ``dataset``'s fingerprint (made if new),
        every data set holding its fingerprint or one of ``examples`` merged into one, its examples added."""
        key = self.dataset_key(dataset["fingerprint"])
        db(
            "INSERT INTO datasets (key, name, size, cap_epsilon, delta, accountant) VALUES (?, ?, ?, NULL, ?, ?) "
            "ON CONFLICT (key) DO NOTHING",
            (key, dataset.get("name") or "?", dataset.get("size"), float(delta), accountant),
        )
        roots = self._roots(db)
        touched = {roots[key]}
        examples = list(examples or [])
        for i in range(0, len(examples), _CHUNK):
            chunk = examples[i : i + _CHUNK]
            sql = f"SELECT DISTINCT dataset_key FROM examples WHERE hash IN ({', '.join('?' * len(chunk))})"
            touched.update(roots[k] for (k,) in db(sql, tuple(chunk)))
        root = self._merge(db, touched) if len(touched) > 1 else roots[key]
        if examples:
            db.many(
                "INSERT INTO examples (hash, dataset_key) VALUES (?, ?) ON CONFLICT (hash) DO NOTHING",
                [(h, key) for h in examples],
            )
        self._lock_dataset(db, root)
        return key, root

    @staticmethod
    def _merge(db, roots: set[str]) -> str:
        """Merge the data sets ``roots`` into one, on the strictest terms: the smallest cap, the smallest δ,
        ``rdp`` unless all use one accountant. Returns the surviving root (a named one if any)."""
        rows = {
            k: (cap, delta, acc, label)
            for k, cap, delta, acc, label in db(
                f"SELECT key, cap_epsilon, delta, accountant, label FROM datasets WHERE key IN "
                f"({', '.join('?' * len(roots))})",
                tuple(sorted(roots)),
            )
        }
        survivor = min(rows, key=lambda k: (rows[k][3] is None, k))
        caps = [r[0] for r in rows.values() if r[0] is not None]
        accountants = {r[2] for r in rows.values()}
        db(
            "UPDATE datasets SET cap_epsilon = ?, delta = ?, accountant = ? WHERE key = ?",
            (
                min(caps) if caps else None,
                min(r[1] for r in rows.values()),
                accountants.pop() if len(accountants) == 1 else "rdp",
                survivor,
            ),
        )
        for k in sorted(rows):
            if k != survivor:
                db("UPDATE datasets SET merged_into = ? WHERE key = ?", (survivor, k))
        return survivor

    # -- writes ---------------------------------------------------------------------------------
    def set_cap(
        self,
        *,
        dataset: dict[str, Any],
        epsilon: float | None,
        delta: float,
        accountant: str = "rdp",
        examples: list[str] | None = None,
    ) -> str:
        """Cap (ε at ``delta``) a data set (``{"name", "fingerprint", "size"}``, and its keyed ``examples``:
        the cap is on the merged data set they belong to); ``epsilon=None`` removes the cap.

        A cap below what is already committed is refused (it could never be honoured). ``epsilon`` must be
        finite and > 0 (None removes the cap: never a NaN), ``delta`` in (0, 1). Returns the data set's key.
        """
        if epsilon is not None and (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, (int, float))
            or not math.isfinite(epsilon)
            or epsilon <= 0
        ):
            raise ValueError(
                f"a cap's epsilon must be a finite number > 0, got {epsilon!r} (epsilon=None removes the cap)"
            )
        _check_delta_accountant(delta, accountant)
        with self._transaction() as db:
            _, key = self._resolve(db, dataset, examples, delta=delta, accountant=accountant)
            db(
                "UPDATE datasets SET cap_epsilon = ?, delta = ?, accountant = ? WHERE key = ?",
                (None if epsilon is None else float(epsilon), float(delta), accountant, key),
            )
            status = self._status(db, key)
            if epsilon is not None and status.committed > epsilon:
                raise BudgetExceeded(
                    f"{status.display_name}: epsilon={status.committed:.4g} is already committed, more than the cap "
                    f"{epsilon:g}"
                )
            return key

    def name_dataset(
        self,
        *,
        dataset: dict[str, Any],
        name: str,
        examples: list[str] | None = None,
        delta: float,
        accountant: str = "rdp",
    ) -> str:
        """Give the (merged) data set of ``dataset`` and its keyed ``examples`` a name, shown by ``budget status``
        and accepted by ``budget status --dataset``; registering its examples on the way (how a data set of an
        older registry learns its examples). A name another data set has is refused. Returns the data set's key."""
        if not isinstance(name, str) or not name.strip() or name != name.strip() or "\n" in name:
            raise ValueError(f"a data set name must be a non-empty line without surrounding spaces, got {name!r}")
        _check_delta_accountant(delta, accountant)
        with self._transaction() as db:
            _, key = self._resolve(db, dataset, examples, delta=delta, accountant=accountant)
            roots = self._roots(db)
            taken = {roots[k] for (k,) in db("SELECT key FROM datasets WHERE label = ?", (name,))} - {key}
            if taken:
                raise ValueError(f"another data set of {self!r} is already named {name!r}")
            db("UPDATE datasets SET label = ? WHERE key = ?", (name, key))
            return key

    def admit(
        self,
        *,
        run_id: str,
        dataset: dict[str, Any],
        planned: list[Release],
        recorded: list[Release] = (),
        path: str | None = None,
        target_epsilon: float | None = None,
        delta: float,
        accountant: str,
        examples: list[str] | None = None,
    ) -> float:
        """Reserve a run's planned events on its data set, or refuse it (:class:`BudgetExceeded`).

        Called before the run reads any data (and again on every resume, with its current plan).
        ``examples``: the run's keyed examples (:meth:`key_examples`): every data set that holds one of
        them is merged with the run's (module docstring). Returns the data set's committed ε with this
        run admitted.
        """
        _check_delta_accountant(delta, accountant)
        _check_events(planned, "planned")
        _check_events(recorded, "recorded")
        with self._transaction() as db:
            key, root = self._resolve(db, dataset, examples, delta=delta, accountant=accountant)
            now = _now()
            db(
                "INSERT INTO runs (run_id, dataset_key, path, planned, target_epsilon, delta, accountant, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET planned = excluded.planned, "
                "path = excluded.path, updated = excluded.updated, released = NULL",  # a resumed run reserves again
                (
                    run_id,
                    key,
                    path,
                    json.dumps([p.to_dict() for p in planned]),
                    target_epsilon,
                    float(delta),
                    accountant,
                    now,
                    now,
                ),
            )
            if db("SELECT dataset_key FROM runs WHERE run_id = ?", (run_id,))[0][0] != key:
                raise ValueError(f"run {run_id} is registered on another data set")
            self._write_events(db, run_id, list(recorded))
            return self._check(db, root, what=f"run {path or run_id}")

    def record(self, *, run_id: str, events: list[Release]) -> float:
        """Replace a run's recorded events with ``events`` (its ledger's, write-ahead); checked against the cap."""
        _check_events(events, "recorded")
        with self._transaction() as db:
            rows = db("SELECT dataset_key, path FROM runs WHERE run_id = ?", (run_id,))
            if not rows:
                raise ValueError(f"run {run_id} was never admitted to {self!r}")
            key, path = rows[0]
            key = self._roots(db)[key]
            self._lock_dataset(db, key)
            self._write_events(db, run_id, events)
            db("UPDATE runs SET updated = ? WHERE run_id = ?", (_now(), run_id))
            return self._check(db, key, what=f"run {path or run_id}")

    def release(self, *, run_id: str, executed: list[Release] | None = None) -> tuple[RunEntry, list[Release]]:
        """Release the reservation of an abandoned run: its charge becomes what it executed.

        What it executed is its recorded events, or ``executed`` (its ledger's) if those count at least
        as many steps in every stage (a save the registry missed); spent steps are never released,
        so two records that disagree either way are refused. The caller makes sure the run is not
        running (:func:`privdiff.privacy.budget.release_run` holds its lock). Returns the run's entry after the
        release and the reservation it freed (empty if it held none: nothing is changed then).
        """
        with self._transaction() as db:
            rows = db("SELECT dataset_key FROM runs WHERE run_id = ?", (run_id,))
            if not rows:
                raise ValueError(f"run {run_id} is not in {self!r}")
            key = self._roots(db)[rows[0][0]]
            self._lock_dataset(db, key)
            entry = next(r for r in self._status(db, key).runs if r.run_id == run_id)
            events = entry.events
            if executed is not None and not _covers(events, executed):
                if not _covers(executed, events):
                    raise ValueError(
                        f"run {run_id}: its ledger ({_steps_by_stage(executed)} steps) and the registry "
                        f"({_steps_by_stage(events)}) disagree; resume the run to reconcile them"
                    )
                events = list(executed)
            freed = entry.reserved
            if freed or events != entry.events:
                now = _now()
                self._write_events(db, run_id, events)
                db("UPDATE runs SET released = ?, updated = ? WHERE run_id = ?", (now, now, run_id))
            return next(r for r in self._status(db, key).runs if r.run_id == run_id), freed

    def withdraw(self, *, run_id: str) -> bool:
        """Remove a run that recorded nothing (its start failed after it was admitted): its reservation
        and its entry go, as if it had never been admitted. A run with recorded events is refused
        (spent steps are never removed; see :meth:`release`). Returns whether an entry was removed."""
        with self._transaction() as db:
            rows = db("SELECT dataset_key FROM runs WHERE run_id = ?", (run_id,))
            if not rows:
                return False
            self._lock_dataset(db, rows[0][0])
            if db("SELECT COUNT(*) FROM events WHERE run_id = ?", (run_id,))[0][0]:
                raise ValueError(f"run {run_id} has recorded events: it cannot be withdrawn, only released")
            db("DELETE FROM runs WHERE run_id = ?", (run_id,))
            return True

    def find_run(self, prefix: str) -> tuple[str, str | None]:
        """(run id, path) of the one run whose id is ``prefix`` or starts with it (at least 8 characters)."""
        with self._transaction() as db:
            rows = db("SELECT run_id, path FROM runs WHERE run_id = ?", (prefix,))
            if not rows and len(prefix) >= 8:
                rows = [r for r in db("SELECT run_id, path FROM runs") if r[0].startswith(prefix)]
        if len(rows) != 1:
            raise ValueError(f"{'no run' if not rows else f'{len(rows)} runs'} with id {prefix!r} in {self!r}")
        return rows[0][0], rows[0][1]

    def _write_events(self, db, run_id: str, events: list[Release]) -> None:
        db("DELETE FROM events WHERE run_id = ?", (run_id,))
        for seq, e in enumerate(events):
            db(
                "INSERT INTO events (run_id, seq, stage, mechanism, noise_multiplier, sample_rate, steps) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, seq, e.stage, e.mechanism, e.noise_multiplier, e.sample_rate, e.steps),
            )

    def _check(self, db, key: str, *, what: str) -> float:
        status = self._status(db, key)
        committed = status.committed
        if status.cap_epsilon is not None and committed > status.cap_epsilon * (1 + 1e-9):
            raise BudgetExceeded(
                f"{what} refused: data set {status.display_name} would reach epsilon={committed:.4g} "
                f"(delta={status.delta:g}, {len(status.runs)} runs composed"
                f"{', on examples it shares with ' + ', '.join(status.sources) if len(status.sources) > 1 else ''}), "
                f"over its cap {status.cap_epsilon:g}"
            )
        return committed

    # -- reads ----------------------------------------------------------------------------------
    def _status(self, db, key: str) -> DatasetStatus:
        """The merged data set ``key`` (a root): its terms, and the runs of every data set merged into it."""
        name, size, cap, delta, accountant, label = db(
            "SELECT name, size, cap_epsilon, delta, accountant, label FROM datasets WHERE key = ?", (key,)
        )[0]
        members = sorted(k for k, root in self._roots(db).items() if root == key)
        marks = ", ".join("?" * len(members))
        names = db(f"SELECT DISTINCT name FROM datasets WHERE key IN ({marks})", tuple(members))
        (n_examples,) = db(f"SELECT COUNT(*) FROM examples WHERE dataset_key IN ({marks})", tuple(members))[0]
        status = DatasetStatus(
            key=key,
            name=name,
            size=int(n_examples) or size,
            cap_epsilon=cap,
            delta=delta,
            accountant=accountant,
            label=label,
            sources=sorted(n for (n,) in names),
        )
        runs = db(
            f"SELECT run_id, path, planned, delta, accountant, created, released FROM runs WHERE dataset_key IN "
            f"({marks}) ORDER BY created, run_id",
            tuple(members),
        )
        for run_id, path, planned, r_delta, r_acc, created, released in runs:
            events = self._events(db, run_id)
            status.runs.append(
                RunEntry(
                    run_id=run_id,
                    path=path,
                    planned=[Release.from_dict(p) for p in json.loads(planned)],
                    events=events,
                    delta=r_delta,
                    accountant=r_acc,
                    created=created,
                    released=released,
                )
            )
        return status

    def status(self, dataset: str | None = None) -> list[DatasetStatus]:
        """Every (merged) data set, or those with a source whose name, given name or key (or a prefix of at least
        8 characters of it) is ``dataset``, with its runs."""
        with self._transaction() as db:
            roots = self._roots(db)
            keys = {
                roots[k]
                for k, n, label in db("SELECT key, name, label FROM datasets")
                if dataset is None
                or dataset in (n, label, k)
                or (len(dataset) >= 8 and k.split(":")[-1].startswith(dataset))
            }
            statuses = [self._status(db, k) for k in keys]
            return sorted(statuses, key=lambda s: (s.display_name, s.key))

    @staticmethod
    def _events(db, run_id: str) -> list[Release]:
        """A run's recorded events, in order (the registry keeps each one's stage, mechanism, σ, q and steps)."""
        rows = db(
            "SELECT stage, mechanism, noise_multiplier, sample_rate, steps FROM events WHERE run_id = ? ORDER BY seq",
            (run_id,),
        )
        return [
            Release(stage=stage, mechanism=mech, noise_multiplier=sigma, sample_rate=q, steps=int(steps))
            for stage, mech, sigma, q, steps in rows
        ]

    def run_events(self, run_id: str) -> list[Release]:
        with self._transaction() as db:
            return self._events(db, run_id)


def format_status(statuses: list[DatasetStatus]) -> str:
    """The text of ``privdiff budget status``: per data set, every run, its ε, and the composed totals."""
    lines = []
    fmt = lambda e: "inf" if math.isinf(e) else f"{e:.4f}"  # noqa: E731
    for s in statuses:
        cap = "no cap" if s.cap_epsilon is None else f"cap epsilon={s.cap_epsilon:g}"
        merged = f"; one data set across {', '.join(s.sources)}" if len(s.sources) > 1 else ""
        named = f" [{s.name}]" if s.label and s.label != s.name else ""
        lines.append(
            f"dataset {s.display_name}{named} ({s.size} examples, {s.key[:24]}...{merged}): {len(s.runs)} runs, "
            f"delta={s.delta:g} ({s.accountant}), {cap}"
        )
        for r in s.runs:
            state = r.state
            lines.append(
                f"  {r.created}  {r.run_id[:12]}  epsilon={fmt(r.epsilon(delta=s.delta, accountant=s.accountant))}  "
                f"steps={r.steps:<6} {state:<8}  {r.path or ''}"
            )
        lines.append(
            f"  composed: spent epsilon={fmt(s.spent)}, committed (with reservations) epsilon={fmt(s.committed)}"
            + ("" if s.cap_epsilon is None else f", left {fmt(max(0.0, s.cap_epsilon - s.committed))}")
        )
    return "\n".join(lines) if lines else "no data sets registered"
