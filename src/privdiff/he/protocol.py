"""What the servers of both modes share: the error a client gets as a 4xx answer, and the table of open
sessions (one per client: its public CKKS context and what the mode keeps with it).

A server holds per-session state that costs memory (a context of several MB, permuted weights), for
clients that may vanish without closing their session. :class:`SessionTable` bounds it twice: at most
``max_sessions`` sessions (opening one more drops the least recently used), and a session idle for
more than ``ttl`` seconds is dropped. Both modes' servers keep their sessions in one.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

__all__ = ["ProtocolError", "SessionTable"]

T = TypeVar("T")


class ProtocolError(ValueError):
    """A request the server refuses (unknown session or layer, wrong number or size of ciphertexts)."""


class SessionTable(Generic[T]):
    """Sessions by random id (128 bits, hex), least recently used first. Thread-safe.

    ``max_sessions``: opening a session beyond it drops the least recently used one. ``ttl``: a session
    not used for longer than ``ttl`` seconds is dropped (checked on every open and get). ``clock`` is
    injectable for tests (monotonic seconds)."""

    def __init__(self, *, max_sessions: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        if max_sessions < 1 or not ttl > 0:
            raise ValueError(f"max_sessions must be >= 1 and ttl > 0, got {max_sessions} and {ttl}")
        self.max_sessions, self.ttl, self._clock = int(max_sessions), float(ttl), clock
        self._entries: OrderedDict[str, tuple[T, float]] = OrderedDict()  # sid -> (value, last use)
        self._lock = threading.Lock()

    def open(self, value: T) -> str:
        """Store ``value`` under a new session id and return the id."""
        sid = secrets.token_hex(16)
        with self._lock:
            self._expire()
            self._entries[sid] = (value, self._clock())
            while len(self._entries) > self.max_sessions:
                self._entries.popitem(last=False)
        return sid

    def get(self, sid: str) -> T:
        """The value of session ``sid`` (now its most recent use); :class:`ProtocolError` if unknown or expired."""
        with self._lock:
            self._expire()
            entry = self._entries.get(sid)
            if entry is None:
                raise ProtocolError(f"unknown or expired session {sid[:32]!r}")
            self._entries[sid] = (entry[0], self._clock())
            self._entries.move_to_end(sid)
            return entry[0]

    def close(self, sid: str) -> None:
        """Drop session ``sid`` (nothing if it is unknown: closing twice is harmless)."""
        with self._lock:
            self._entries.pop(sid, None)

    def values(self) -> list[T]:
        """The values of the live sessions, least recently used first."""
        with self._lock:
            self._expire()
            return [v for v, _ in self._entries.values()]

    def __len__(self) -> int:
        return len(self.values())

    def _expire(self) -> None:
        now = self._clock()
        for sid in [s for s, (_, last) in self._entries.items() if now - last > self.ttl]:
            del self._entries[sid]
