"""The session table and the fair scheduler both servers run on.

The table against an obvious reference (a list scanned on every operation) on random sequences of
opens from three clients, uses, holds (a request in flight), closes and clock advances; then the
properties the service relies on: tokens are capabilities bound to their client, an active session is
never evicted by another client's opens, a full table refuses with a Retry-After after which an
open succeeds. The scheduler: a job past its timeout stops at its next check and frees its worker;
one group flooding jobs does not delay another group by more than one job; its limits."""

from __future__ import annotations

import random
import threading
import time

import pytest

from privdiff.he.protocol import (
    Cancelled,
    Deadline,
    FairScheduler,
    ServerBusy,
    SessionNotFound,
    SessionTable,
    TooManyRequests,
)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Reference:
    """The table's rules, written out: entries (token, owner, value, opened, last, used, inflight) in LRU order."""

    def __init__(self, max_sessions, max_per_owner, ttl, idle, grace):
        self.max, self.per, self.ttl, self.idle, self.grace = max_sessions, max_per_owner, ttl, idle, grace
        self.entries: list[dict] = []

    def expire(self, now):
        self.entries = [e for e in self.entries if e["inflight"] or now - e["last"] <= self.ttl]

    def evictable(self, e, now):
        if e["inflight"]:
            return False
        return now - e["last"] >= self.idle if e["used"] else now - e["opened"] >= self.grace

    def open(self, owner, now):
        self.expire(now)
        own = [e for e in self.entries if e["owner"] == owner]
        if len(own) >= self.per:
            victims = [e for e in own if self.evictable(e, now)]
            if not victims:
                return "429"
            self.entries.remove(victims[0])
        if len(self.entries) >= self.max:
            victims = [e for e in self.entries if self.evictable(e, now)]
            if not victims:
                return "503"
            self.entries.remove(victims[0])
        return "ok"

    def find(self, token, owner, now):
        for e in self.entries:
            if e["token"] == token:
                if not e["inflight"] and now - e["last"] > self.ttl:
                    self.entries.remove(e)
                    return None
                return e if e["owner"] == owner else None
        return None

    def touch(self, e, now):
        e["used"], e["last"] = True, now
        self.entries.remove(e)
        self.entries.append(e)


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_the_reference(seed):
    rnd = random.Random(seed)
    max_sessions, per = rnd.randint(2, 6), rnd.randint(1, 3)
    ttl = rnd.choice([5.0, 20.0])
    idle, grace = rnd.choice([1.0, 4.0]), rnd.choice([0.5, 2.0])
    idle = min(idle, ttl)
    clock = Clock()
    table = SessionTable(
        max_sessions=max_sessions,
        ttl=ttl,
        max_per_owner=per,
        idle_evict=idle,
        unused_grace=grace,
        max_inflight=2,
        clock=clock,
    )
    ref = Reference(max_sessions, per, ttl, idle, grace)
    owners = ("a", "b", "c")
    tokens: list[tuple[str, str]] = []  # (token, owner) ever issued
    held: list[tuple[object, dict]] = []  # open use() contexts and their reference entries
    for i in range(500):
        op = rnd.random()
        now = clock.now
        if op < 0.2:
            clock.now += rnd.choice([0.0, 0.3, 1.0, 2.5, 6.0])
        elif op < 0.45:
            owner = rnd.choice(owners)
            want = ref.open(owner, now)
            try:
                token = table.open(i, owner=owner)
                got = "ok"
            except TooManyRequests as e:
                got = "429"
                assert e.retry_after >= 1
            except ServerBusy as e:
                got = "503"
                assert e.retry_after >= 1
            assert got == want, (i, got, want)
            if got == "ok":
                ref.entries.append(
                    {
                        "token": token,
                        "owner": owner,
                        "value": i,
                        "opened": now,
                        "last": now,
                        "used": False,
                        "inflight": 0,
                    }
                )
                tokens.append((token, owner))
        elif op < 0.65 and tokens:
            token, owner = rnd.choice(tokens)
            if rnd.random() < 0.2:  # from another client, or with the secret changed
                owner = rnd.choice([o for o in owners if o != owner]) if rnd.random() < 0.5 else owner
                token = token if owner != dict(tokens).get(token) else token[:-1] + ("A" if token[-1] != "A" else "B")
            e = ref.find(token, owner, now)
            if e is None:
                with pytest.raises(SessionNotFound):
                    table.get(token, owner=owner)
            else:
                assert table.get(token, owner=owner) == e["value"]
                ref.touch(e, now)
        elif op < 0.75 and tokens:  # a request starts
            token, owner = rnd.choice(tokens)
            e = ref.find(token, owner, now)
            cm = table.use(token, owner=owner)
            if e is None:
                with pytest.raises(SessionNotFound):
                    cm.__enter__()
            elif e["inflight"] >= 2:
                with pytest.raises(TooManyRequests):
                    cm.__enter__()
            else:
                assert cm.__enter__() == e["value"]
                ref.touch(e, now)
                e["inflight"] += 1
                held.append((cm, e))
        elif op < 0.85 and held:  # a request ends
            cm, e = held.pop(rnd.randrange(len(held)))
            cm.__exit__(None, None, None)
            e["inflight"] -= 1
            e["last"] = now
        elif tokens:
            token, owner = rnd.choice(tokens)
            e = ref.find(token, owner, now)
            if e is None:
                with pytest.raises(SessionNotFound):
                    table.close(token, owner=owner)
            else:
                table.close(token, owner=owner)
                ref.entries.remove(e)
                held = [(c, x) for c, x in held if x is not e]
        ref.expire(clock.now)
        assert table.values() == [e["value"] for e in ref.entries], i
        assert len(ref.entries) <= max_sessions and all(
            sum(e["owner"] == o for e in ref.entries) <= per for o in owners
        )


def test_an_active_session_survives_any_number_of_opens():
    clock = Clock()
    table = SessionTable(max_sessions=3, ttl=100.0, max_per_owner=2, idle_evict=5.0, unused_grace=1.0, clock=clock)
    mine = table.open("mine", owner="victim")
    refused = 0
    for i in range(2000):  # four other clients open sessions as fast as they can, for 200 s
        clock.now += 0.1
        if i % 10 == 0:
            assert table.get(mine, owner="victim") == "mine"  # the victim keeps using its session
        try:
            table.open(i, owner=f"attacker{i % 4}")
        except (TooManyRequests, ServerBusy) as e:
            refused += 1
            assert e.retry_after >= 1
    assert table.get(mine, owner="victim") == "mine" and refused > 0
    # even from the victim's own address, opens only ever evict its idle sessions
    with table.use(mine, owner="victim"):
        clock.now += 50.0
        for i in range(5):
            try:
                table.open(i, owner="victim")
            except (TooManyRequests, ServerBusy):
                pass
        assert table.get(mine, owner="victim") == "mine"


def test_a_full_table_says_when_to_retry_and_then_admits():
    clock = Clock()
    table = SessionTable(max_sessions=2, ttl=100.0, max_per_owner=2, idle_evict=5.0, unused_grace=2.0, clock=clock)
    a = table.open("a", owner="x")
    table.get(a, owner="x")
    table.open("b", owner="y")
    with pytest.raises(ServerBusy) as e:
        table.open("c", owner="z")
    assert e.value.retry_after == 2  # b, opened and never used, is evictable after the 2 s grace
    clock.now += e.value.retry_after
    table.open("c", owner="z")
    assert sorted(table.values()) == ["a", "c"]


def test_tokens_are_unguessable_capabilities():
    table = SessionTable(max_sessions=1000, ttl=60.0)
    tokens = {table.open(None, owner="me") for _ in range(300)}
    assert len(tokens) == 300 and all(len(t) == 60 and t[16] == "." for t in tokens)
    t = next(iter(tokens))
    for bad in (t[:17] + "A" * 43, t[:16], t + "x", "", "../etc", t.upper(), 17):
        with pytest.raises(SessionNotFound):
            table.get(bad, owner="me")
    with pytest.raises(SessionNotFound):
        table.get(t, owner="someone else")
    with pytest.raises(SessionNotFound):
        table.close(t, owner="someone else")
    table.close(t, owner="me")
    with pytest.raises(SessionNotFound):
        table.close(t, owner="me")


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_sessions"):
        SessionTable(max_sessions=0, ttl=1.0)
    with pytest.raises(ValueError, match="ttl > 0"):
        SessionTable(max_sessions=1, ttl=0.0)
    with pytest.raises(ValueError, match="idle_evict <= ttl"):
        SessionTable(max_sessions=1, ttl=1.0, idle_evict=2.0)


# -- the scheduler --------------------------------------------------------------------------------
def test_a_job_past_its_timeout_stops_and_frees_its_worker():
    sched = FairScheduler(1, timeout=0.3)
    checks = []

    def endless(d: Deadline):
        while True:
            d.check()
            checks.append(time.monotonic())
            time.sleep(0.01)

    t0 = time.monotonic()
    job = sched.submit("a", "k", endless)
    with pytest.raises(Cancelled, match="longer than 0.3 s"):
        job.future.result(timeout=10)
    stopped = time.monotonic() - t0
    assert 0.3 <= stopped < 1.5, stopped
    n = len(checks)
    time.sleep(0.1)
    assert len(checks) == n  # nothing runs on after the answer
    nxt = sched.submit("b", "k", lambda d: time.monotonic())
    assert nxt.future.result(timeout=10) - t0 < stopped + 0.5  # the worker was free at once
    # a job given up by its request (the client went away) stops at its next check too
    job = sched.submit("a", "k", endless)
    time.sleep(0.05)
    job.deadline.cancel("the client went away")
    with pytest.raises(Cancelled, match="went away"):
        job.future.result(timeout=10)
    sched.shutdown()


def test_one_group_flooding_does_not_starve_another():
    sched = FairScheduler(1, timeout=10.0, max_pending_per_key=3, max_pending=100)
    started: list[str] = []

    def job(name):
        def run(d):
            started.append(name)
            time.sleep(0.05)

        return run

    jobs = [sched.submit("attacker", f"s{k}", job(f"a{k}.{i}")) for i in range(3) for k in range(4)]
    time.sleep(0.02)  # the first attacker job is running
    victim = sched.submit("victim", "s", job("victim"))
    victim.future.result(timeout=10)
    assert started.index("victim") <= 2, started  # after at most the running job and one more
    for j in jobs:
        j.future.result(timeout=10)
    # within one group, the keys take turns too
    assert started[:4] == ["a0.0", "victim", "a1.0", "a2.0"] or started.index("a1.0") < started.index("a0.1")
    sched.shutdown()


def test_scheduler_limits():
    release = threading.Event()
    sched = FairScheduler(2, timeout=10.0, max_running_per_group=1, max_pending_per_key=2, max_pending=3)
    running = []

    def block(d):
        running.append(threading.current_thread().name)
        release.wait(5)

    a1 = sched.submit("A", "1", block)
    a2 = sched.submit("A", "2", block)  # A may run one job at a time: this one waits
    b1 = sched.submit("B", "1", block)  # B runs next to A's first
    time.sleep(0.2)
    assert len(running) == 2 and sched.busy() == (2, 1)
    sched.submit("A", "1", block)
    with pytest.raises(TooManyRequests):  # key A/1 has one running and one waiting
        sched.submit("A", "1", block)
    sched.submit("C", "1", block)
    with pytest.raises(ServerBusy):  # three waiting in all
        sched.submit("D", "1", block)
    release.set()
    for j in (a1, a2, b1):
        j.future.result(timeout=10)
    sched.shutdown()


def test_a_job_that_waited_too_long_is_refused():
    idle = threading.Event()
    sched = FairScheduler(1, timeout=10.0, queue_timeout=0.1, on_idle=idle.set)
    slow = sched.submit("a", "1", lambda d: time.sleep(0.4))
    late = sched.submit("b", "1", lambda d: "ran")
    with pytest.raises(ServerBusy, match="waited"):
        late.future.result(timeout=10)
    slow.future.result(timeout=10)
    assert idle.wait(5)
    sched.shutdown()
