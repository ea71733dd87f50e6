"""What the servers of both modes share: the errors a client gets as 4xx/503 answers, the table of
open sessions, the fair queue that runs their work, and giving freed memory back to the system.

**Sessions** (:class:`SessionTable`). A session holds server memory (a context, permuted weights) for a
client that may vanish without closing it. Its id is a capability: ``<index>.<secret>`` with a
256-bit secret (``secrets.token_urlsafe``) compared in constant time (``hmac.compare_digest``), and
it is bound to the remote address that opened it (a token used from another address is unknown).
The table is bounded three ways, and none of them lets one client push out another client's
active session:

- at most ``max_sessions`` sessions, and at most ``max_per_owner`` per remote address;
- when either limit is reached, opening one more evicts the least recently used *evictable*
  session (of that address, for its own limit): one with no request in flight that was idle for
  ``idle_evict`` seconds, or opened and never used for ``unused_grace`` seconds. If there is none,
  the open is refused (429 for the address's limit, 503 for the table's) with the seconds after
  which one will be evictable (``Retry-After``);
- a session idle for ``ttl`` seconds is dropped.

**Work** (:class:`FairScheduler`). Requests that compute run on ``workers`` threads, picked round
robin over remote addresses and, within one address, over its sessions, with at most one running
request per session and a bounded queue (429/503 beyond it). A running request gets a
:class:`Deadline`; the work checks it between homomorphic operations and stops (503) once its
``timeout`` has passed, so a request that times out frees its worker within one operation.

**Memory** (:class:`MemoryTrimmer`). glibc keeps freed memory in its arenas; the server asks it to
give it back (``malloc_trim``) after sessions are dropped and whenever the queue runs empty.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import hmac
import math
import re
import secrets
import sys
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

__all__ = [
    "ProtocolError",
    "SessionNotFound",
    "TooManyRequests",
    "ServerBusy",
    "PayloadTooLarge",
    "Cancelled",
    "SessionTable",
    "Deadline",
    "FairScheduler",
    "MemoryTrimmer",
    "trim_memory",
    "server_allocator",
]

T = TypeVar("T")


class ProtocolError(ValueError):
    """A request the server refuses; ``status`` is its HTTP status, ``retry_after`` (s) when trying
    again later may succeed."""

    status = 400

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class SessionNotFound(ProtocolError):
    status = 404


class PayloadTooLarge(ProtocolError):
    status = 413


class TooManyRequests(ProtocolError):
    """This client (remote address or session) is at one of its limits."""

    status = 429


class ServerBusy(ProtocolError):
    """The server as a whole is at a limit (sessions, queue, memory for requests)."""

    status = 503


class Cancelled(ServerBusy):
    """The request's computation ran past its time and was stopped."""


# -- sessions -------------------------------------------------------------------------------------
_TOKEN = re.compile(r"^([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")


@dataclass
class _Entry(Generic[T]):
    secret: str
    owner: str | None
    opened: float
    last: float
    value: Any = None
    ready: bool = False  # False while reserved (its context is being loaded)
    used: bool = False
    inflight: int = 0


class SessionTable(Generic[T]):
    """Sessions by capability token, bound to the address that opened them. Thread-safe.

    ``max_sessions``/``max_per_owner``: limits (``max_per_owner`` None: no per-address limit).
    ``idle_evict``/``unused_grace``: when a session may be evicted to make room (see the module
    docstring). ``ttl``: idle sessions are dropped after it. ``max_inflight``: requests one session
    may have in progress at once (429 beyond). ``on_drop`` is called (outside the lock) after
    sessions were dropped. ``clock`` is injectable for tests (monotonic seconds)."""

    def __init__(
        self,
        *,
        max_sessions: int,
        ttl: float,
        max_per_owner: int | None = None,
        idle_evict: float | None = None,
        unused_grace: float = 10.0,
        max_inflight: int = 2,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[], None] | None = None,
    ):
        if max_sessions < 1 or not ttl > 0 or (max_per_owner is not None and max_per_owner < 1):
            raise ValueError(
                f"max_sessions (and max_per_owner) must be >= 1 and ttl > 0, got {max_sessions}, {max_per_owner} and {ttl}"
            )
        idle_evict = ttl if idle_evict is None else idle_evict
        if not (0 < idle_evict <= ttl and 0 < unused_grace and max_inflight >= 1):
            raise ValueError(
                f"need 0 < idle_evict <= ttl, unused_grace > 0, max_inflight >= 1; got {idle_evict}, {unused_grace}, {max_inflight}"
            )
        self.max_sessions, self.ttl, self.max_per_owner = int(max_sessions), float(ttl), max_per_owner
        self.idle_evict, self.unused_grace, self.max_inflight = (
            float(idle_evict),
            float(unused_grace),
            int(max_inflight),
        )
        self._clock, self._on_drop = clock, on_drop
        self._entries: collections.OrderedDict[str, _Entry] = (
            collections.OrderedDict()
        )  # index -> entry, least recently used first
        self._lock = threading.Lock()

    # -- opening ---------------------------------------------------------------------------------
    def reserve(self, owner: str | None = None) -> str:
        """Hold a place for a session of ``owner`` (evicting an evictable one if a limit is reached);
        :class:`TooManyRequests` / :class:`ServerBusy` with ``retry_after`` if there is none. Returns
        the reservation, for :meth:`fill` or :meth:`cancel`."""
        dropped = 0
        try:
            with self._lock:
                now = self._clock()
                dropped += self._expire(now)
                if self.max_per_owner is not None:
                    own = [i for i, e in self._entries.items() if e.owner == owner]
                    if len(own) >= self.max_per_owner:
                        dropped += self._evict(
                            own,
                            now,
                            TooManyRequests,
                            f"this client already has {len(own)} sessions (at most {self.max_per_owner}), all active: close one or retry later",
                        )
                if len(self._entries) >= self.max_sessions:
                    dropped += self._evict(
                        list(self._entries),
                        now,
                        ServerBusy,
                        f"all {self.max_sessions} sessions are active: retry later",
                    )
                index = secrets.token_hex(8)
                while index in self._entries:
                    index = secrets.token_hex(8)
                self._entries[index] = _Entry(secrets.token_urlsafe(32), owner, now, now)
                return index
        finally:
            self._dropped(dropped)

    def fill(self, reservation: str, value: T) -> str:
        """Store the session's value in its reservation; returns its token ``<index>.<secret>``."""
        with self._lock:
            e = self._entries[reservation]
            e.value, e.ready = value, True
            e.opened = e.last = self._clock()
            return f"{reservation}.{e.secret}"

    def cancel(self, reservation: str) -> None:
        """Give back a reservation that was not filled."""
        with self._lock:
            e = self._entries.get(reservation)
            if e is not None and not e.ready:
                del self._entries[reservation]

    def open(self, value: T, *, owner: str | None = None) -> str:
        """Store ``value`` as a new session of ``owner`` and return its token."""
        return self.fill(self.reserve(owner), value)

    def open_with(self, make: Callable[[], T], *, owner: str | None = None) -> str:
        """Reserve a place for ``owner`` first, then build the session with ``make()`` (costly work is
        never done for a client the table would refuse); a failed build gives the place back."""
        reservation = self.reserve(owner)
        try:
            value = make()
        except BaseException:
            self.cancel(reservation)
            raise
        return self.fill(reservation, value)

    # -- using -----------------------------------------------------------------------------------
    def get(self, token: str, *, owner: str | None = None) -> T:
        """The value of session ``token`` (now its most recent use); :class:`SessionNotFound` if the
        token is unknown, expired, or was opened from another address."""
        with self._lock:
            index, e = self._find(token, owner)
            self._touch(index, e)
            return e.value

    @contextmanager
    def use(self, token: str, *, owner: str | None = None) -> Iterator[T]:
        """The session's value, counted as in use (never evicted or expired) until the block ends."""
        with self._lock:
            index, e = self._find(token, owner)
            if e.inflight >= self.max_inflight:
                raise TooManyRequests(
                    f"this session already has {e.inflight} requests in progress (at most {self.max_inflight})",
                    retry_after=1,
                )
            e.inflight += 1
            self._touch(index, e)
        try:
            yield e.value
        finally:
            with self._lock:
                e.inflight -= 1
                e.last = self._clock()

    def close(self, token: str, *, owner: str | None = None) -> None:
        """Drop session ``token``; :class:`SessionNotFound` as :meth:`get`."""
        with self._lock:
            index, _ = self._find(token, owner)
            del self._entries[index]
        self._dropped(1)

    def values(self) -> list[T]:
        """The values of the live sessions, least recently used first."""
        with self._lock:
            dropped = self._expire(self._clock())
            out = [e.value for e in self._entries.values() if e.ready]
        self._dropped(dropped)
        return out

    def __len__(self) -> int:
        return len(self.values())

    # -- internals (called with the lock held) ------------------------------------------------------
    def _find(self, token: str, owner: str | None) -> tuple[str, _Entry]:
        m = _TOKEN.match(token) if isinstance(token, str) else None
        e = self._entries.get(m.group(1)) if m else None
        now = self._clock()
        if e is not None and e.ready and e.inflight == 0 and now - e.last > self.ttl:
            del self._entries[m.group(1)]
            e = None
        # compare the secret in constant time; the owner check does not depend on the secret
        if e is None or not e.ready or not hmac.compare_digest(e.secret, m.group(2)) or e.owner != owner:
            raise SessionNotFound(f"unknown or expired session {str(token)[:16]!r}")
        return m.group(1), e

    def _touch(self, index: str, e: _Entry) -> None:
        e.used, e.last = True, self._clock()
        self._entries.move_to_end(index)

    def _wait(self, e: _Entry, now: float) -> float:
        """Seconds until ``e`` becomes evictable (``idle_evict`` for one in use: unknown)."""
        if not e.ready or e.inflight:
            return self.idle_evict
        return max(0.0, (e.last + self.idle_evict if e.used else e.opened + self.unused_grace) - now)

    def _evict(self, candidates: list[str], now: float, error: type[ProtocolError], message: str) -> int:
        for index in candidates:  # least recently used first
            if self._wait(self._entries[index], now) <= 0:
                del self._entries[index]
                return 1
        wait = min(self._wait(self._entries[i], now) for i in candidates)
        raise error(message, retry_after=max(1, math.ceil(wait)))

    def _expire(self, now: float) -> int:
        old = [i for i, e in self._entries.items() if e.ready and not e.inflight and now - e.last > self.ttl]
        for i in old:
            del self._entries[i]
        return len(old)

    def _dropped(self, n: int) -> None:
        if n and self._on_drop is not None:
            self._on_drop()


# -- work -----------------------------------------------------------------------------------------
class Deadline:
    """A running request's time limit and cancellation flag; the work calls :meth:`check` between
    homomorphic operations (each takes milliseconds), which raises :class:`Cancelled` once it is up."""

    def __init__(self, seconds: float | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.seconds, self._clock = seconds, clock
        self.expires = math.inf
        self.reason: str | None = None

    def start(self) -> None:
        if self.seconds is not None:
            self.expires = self._clock() + self.seconds

    def cancel(self, reason: str) -> None:
        self.reason = self.reason or reason

    def check(self) -> None:
        if self.reason is None and self._clock() > self.expires:
            self.reason = f"computation took longer than {self.seconds:g} s and was stopped"
        if self.reason is not None:
            raise Cancelled(self.reason, retry_after=1)


@dataclass
class _Job:
    group: Any
    key: Any
    fn: Callable[[Deadline], Any]
    deadline: Deadline
    queued: float
    future: Future = field(default_factory=Future)


class FairScheduler:
    """``workers`` threads running submitted work round robin over groups (remote addresses) and, in a
    group, over keys (sessions), one running job per key and at most ``max_running_per_group`` per
    group. ``max_pending_per_key`` (queued + running) and ``max_pending`` (queued, all keys) bound
    the queue; a job that waited ``queue_timeout`` seconds is dropped (503); a running job gets a
    :class:`Deadline` of ``timeout`` seconds. ``on_idle`` is called when the last job finishes."""

    def __init__(
        self,
        workers: int,
        *,
        timeout: float,
        queue_timeout: float = 60.0,
        max_running_per_group: int | None = None,
        max_pending_per_key: int = 2,
        max_pending: int = 64,
        on_idle: Callable[[], None] | None = None,
        name: str = "privdiff-he",
    ):
        if workers < 1 or not timeout > 0 or not queue_timeout > 0:
            raise ValueError(
                f"need workers >= 1, timeout > 0, queue_timeout > 0; got {workers}, {timeout}, {queue_timeout}"
            )
        self.timeout, self.queue_timeout = float(timeout), float(queue_timeout)
        self.max_running_per_group = max_running_per_group or workers
        self.max_pending_per_key, self.max_pending, self._on_idle = max_pending_per_key, max_pending, on_idle
        self._queues: collections.OrderedDict[Any, collections.OrderedDict[Any, collections.deque]] = (
            collections.OrderedDict()
        )
        self._running_key: collections.Counter = collections.Counter()
        self._running_group: collections.Counter = collections.Counter()
        self._queued = 0
        self._idle_pending = False  # a job finished or was dropped since on_idle was last called
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, group: Any, key: Any, fn: Callable[[Deadline], Any]) -> _Job:
        """Queue ``fn(deadline)``; the job's ``future`` has its result. :class:`TooManyRequests` if the
        key has ``max_pending_per_key`` jobs already, :class:`ServerBusy` if the queue is full."""
        with self._cond:
            if self._stop:
                raise ServerBusy("the server is shutting down", retry_after=5)
            keys = self._queues.setdefault(group, collections.OrderedDict())
            q = keys.setdefault(key, collections.deque())
            if len(q) + self._running_key[(group, key)] >= self.max_pending_per_key:
                raise TooManyRequests(
                    f"this session already has {self.max_pending_per_key} requests waiting or running", retry_after=1
                )
            if self._queued >= self.max_pending:
                raise ServerBusy(f"{self._queued} requests are waiting: retry later", retry_after=1)
            job = _Job(group, key, fn, Deadline(self.timeout), time.monotonic())
            q.append(job)
            self._queued += 1
            self._cond.notify()
            return job

    def busy(self) -> tuple[int, int]:
        """(running, queued) jobs."""
        with self._cond:
            return sum(self._running_group.values()), self._queued

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            for keys in self._queues.values():
                for q in keys.values():
                    for job in q:
                        if job.future.set_running_or_notify_cancel():
                            job.future.set_exception(ServerBusy("the server is shutting down", retry_after=5))
            self._queues.clear()
            self._queued = 0
            self._cond.notify_all()

    def _pick(self) -> _Job | None:
        now = time.monotonic()
        for group in list(self._queues):
            keys = self._queues[group]
            for key in list(keys):  # drop what waited too long or was given up by its request
                q = keys[key]
                while q and (
                    now - q[0].queued > self.queue_timeout
                    or q[0].deadline.reason is not None
                    or q[0].future.cancelled()
                ):
                    job = q.popleft()
                    self._queued -= 1
                    self._idle_pending = True
                    if job.future.set_running_or_notify_cancel():
                        job.future.set_exception(
                            ServerBusy(
                                f"the request waited {self.queue_timeout:g} s in the queue: retry later", retry_after=1
                            )
                        )
                if not q and not self._running_key[(group, key)]:
                    del keys[key]
            if not keys and not self._running_group[group]:
                del self._queues[group]
        for group in list(self._queues):
            if self._running_group[group] >= self.max_running_per_group:
                continue
            keys = self._queues[group]
            for key in list(keys):
                if keys[key] and not self._running_key[(group, key)]:
                    job = keys[key].popleft()
                    self._queued -= 1
                    keys.move_to_end(key)  # round robin: this key goes last in its group,
                    self._queues.move_to_end(group)  # and this group last among groups
                    self._running_key[(group, key)] += 1
                    self._running_group[group] += 1
                    return job
        return None

    def _work(self) -> None:
        while True:
            idle = False
            with self._cond:
                job = self._pick()
                while job is None:
                    if self._stop:
                        return
                    if self._idle_pending and not self._running_group and not self._queued:
                        self._idle_pending, idle = False, True
                        break
                    self._cond.wait(timeout=1.0)
                    job = self._pick()
            if idle:
                if self._on_idle is not None:
                    self._on_idle()
                continue
            try:
                if job.future.set_running_or_notify_cancel():
                    job.deadline.start()
                    try:
                        job.future.set_result(job.fn(job.deadline))
                    except BaseException as e:  # noqa: BLE001 - handed to the request
                        job.future.set_exception(e)
            finally:
                with self._cond:
                    self._running_key[(job.group, job.key)] -= 1
                    self._running_group[job.group] -= 1
                    if not self._running_key[(job.group, job.key)]:
                        del self._running_key[(job.group, job.key)]
                    if not self._running_group[job.group]:
                        del self._running_group[job.group]
                    self._idle_pending = True
                    self._cond.notify_all()
                del job


# -- memory ---------------------------------------------------------------------------------------
_libc = None


def trim_memory() -> bool:
    """Ask glibc to return free memory of all its arenas to the system (``malloc_trim(0)``); False
    where there is no glibc."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(_libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def server_allocator() -> bool:
    """glibc's allocator as a long-running server wants it, fixed at glibc's defaults: blocks of 128 KiB
    and more mapped on their own (unmapped when freed), the heap trimmed once 128 KiB are free at its
    top, 128 KiB of padding (and these no longer raised as large blocks are freed). This undoes
    :func:`privdiff.runtime.keep_freed_memory`, the training commands' setting, where it ran. False
    where there is no glibc."""
    from ..runtime import _M_MMAP_THRESHOLD, _M_TOP_PAD, _M_TRIM_THRESHOLD

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, 128 << 10)
        and mallopt(_M_TRIM_THRESHOLD, 128 << 10)
        and mallopt(_M_TOP_PAD, 128 << 10)
    )


class MemoryTrimmer:
    """:func:`trim_memory` on a background thread when :meth:`request` ed, at most every ``interval`` s."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.trims = interval, 0
        self._event, self._stop = threading.Event(), False
        self._thread = threading.Thread(target=self._run, name="privdiff-he-trim", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._event.set()

    def close(self) -> None:
        self._stop = True
        self._event.set()

    def _run(self) -> None:
        while True:
            self._event.wait()
            if self._stop:
                return
            self._event.clear()
            trim_memory()
            self.trims += 1
            time.sleep(self.interval)
