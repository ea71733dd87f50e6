"""The session table of both modes' servers against an obvious reference (a list scanned on every
operation), on random sequences of open/get/close and clock advances; and its errors."""

from __future__ import annotations

import random

import pytest

from privdiff.he.protocol import ProtocolError, SessionTable


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reference_drop(ref: list, now: float, ttl: float) -> list:
    """Sessions idle for more than ttl are gone."""
    return [(sid, v, last) for sid, v, last in ref if now - last <= ttl]


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_match_the_reference(seed):
    rnd = random.Random(seed)
    max_sessions, ttl = rnd.randint(1, 5), rnd.choice([0.5, 2.0, 10.0])
    clock = Clock()
    table = SessionTable(max_sessions=max_sessions, ttl=ttl, clock=clock)
    ref: list[tuple[str, int, float]] = []  # (sid, value, last use), least recently used first
    known: list[str] = []
    for i in range(400):
        op = rnd.random()
        if op < 0.3:
            clock.now += rnd.choice([0.0, 0.1, 0.4, 1.0, 3.0])
        elif op < 0.6:
            sid = table.open(i)
            ref = reference_drop(ref, clock.now, ttl) + [(sid, i, clock.now)]
            ref = ref[-max_sessions:]  # the least recently used beyond the cap are dropped
            known.append(sid)
        elif op < 0.9 and known:
            sid = rnd.choice(known)
            ref = reference_drop(ref, clock.now, ttl)
            hit = [e for e in ref if e[0] == sid]
            if hit:
                assert table.get(sid) == hit[0][1]
                ref = [e for e in ref if e[0] != sid] + [(sid, hit[0][1], clock.now)]
            else:
                with pytest.raises(ProtocolError, match="unknown or expired session"):
                    table.get(sid)
        elif known:
            sid = rnd.choice(known)
            table.close(sid)
            ref = [e for e in ref if e[0] != sid]
        assert table.values() == [v for _, v, _ in reference_drop(ref, clock.now, ttl)]


def test_ids_are_fresh_and_bad_limits_are_refused():
    table = SessionTable(max_sessions=1000, ttl=60.0)
    ids = {table.open(None) for _ in range(500)}
    assert len(ids) == 500 and all(len(s) == 32 for s in ids)
    table.close("nope")  # closing an unknown session is harmless
    with pytest.raises(ValueError, match="max_sessions must be >= 1"):
        SessionTable(max_sessions=0, ttl=1.0)
    with pytest.raises(ValueError, match="ttl > 0"):
        SessionTable(max_sessions=1, ttl=0.0)
