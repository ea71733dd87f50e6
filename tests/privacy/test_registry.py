"""The budget registry, on SQLite and on a real PostgreSQL server (same tests, both backends)."""

import hashlib
import threading

import dp_accounting
import pytest

from privdiff.privacy.accounting import RDP_ORDERS, epsilon
from privdiff.privacy.registry import BudgetExceeded, Registry

DATA = {"name": "toy", "fingerprint": "sha256:" + hashlib.sha256(b"toy data").hexdigest(), "size": 1000}
DELTA = 1e-5


def _event(sigma, q, steps, stage="dp_sgd"):
    return {"stage": stage, "mechanism": "subsampled_gaussian", "noise_multiplier": sigma, "sample_rate": q, "steps": steps}


def _plan():
    """A DP-SGD stage of epsilon 2.60 alone; two compose to 3.69, three to 4.56 (RDP, delta 1e-5)."""
    return [_event(1.5, 0.05, 200)]


def _admit(reg, run_id, planned, **kw):
    return reg.admit(run_id=run_id, dataset=DATA, planned=planned, delta=DELTA, accountant="rdp", **kw)


def test_refused_over_the_cap_before_anything_is_recorded(registry_url):
    reg = Registry(registry_url)
    reg.set_cap(dataset=DATA, epsilon=3.0, delta=DELTA)
    _admit(reg, "a", _plan())
    with pytest.raises(BudgetExceeded, match="over its cap 3"):
        _admit(reg, "b", _plan())
    (status,) = reg.status("toy")
    assert [r.run_id for r in status.runs] == ["a"]  # the refused run left nothing
    assert status.committed == pytest.approx(2.6026, abs=1e-3) and status.spent == 0.0  # reserved, nothing executed yet
    # a cap below what is already committed cannot be honoured
    with pytest.raises(BudgetExceeded):
        reg.set_cap(dataset=DATA, epsilon=1.0, delta=DELTA)
    # a non-private run spends infinity: refused on a capped data set
    with pytest.raises(BudgetExceeded):
        _admit(reg, "c", [{**_event(0.0, 0.05, 10), "mechanism": "non_private"}])


def test_composition_across_runs_is_the_accountants(registry_url):
    reg = Registry(registry_url)
    runs = {"r1": [_event(1.1, 0.01, 300)], "r2": [_event(0.8, 0.05, 50), _event(2.0, 0.02, 100, stage="later")],
            "r3": [_event(1.5, 0.1, 20, stage="central_images"), _event(1.0, 0.02, 80)]}
    for run_id, events in runs.items():
        _admit(reg, run_id, events)
        reg.record(run_id=run_id, events=events)
    (status,) = reg.status()
    triples = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for ev in runs.values() for e in ev]
    assert status.spent == pytest.approx(epsilon(triples, delta=DELTA))
    assert status.committed == pytest.approx(status.spent)  # every run recorded its plan
    # the same composition with Google's dp-accounting RDP accountant
    acc = dp_accounting.rdp.RdpAccountant(orders=RDP_ORDERS)
    for s, q, t in triples:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), t)
    assert status.spent == pytest.approx(acc.get_epsilon(DELTA), rel=2e-2)
    # composed by the accountant, which is tighter than adding the runs' epsilons
    assert status.spent < sum(r.epsilon() for r in status.runs)


def test_record_replaces_a_runs_events_never_duplicates(registry_url):
    reg = Registry(registry_url)
    plan = _plan()
    _admit(reg, "a", plan)
    for steps in (1, 2, 2, 3, 3, 3):  # write-ahead saves, replays after a crash included
        reg.record(run_id="a", events=[{**plan[0], "steps": steps}])
    assert reg.run_events("a") == [{**plan[0], "steps": 3}]
    # on resume a run is admitted again with what it recorded: still one run
    _admit(reg, "a", plan, recorded=[{**plan[0], "steps": 3}])
    (status,) = reg.status()
    assert len(status.runs) == 1 and status.runs[0].steps == 3 and not status.runs[0].complete
    assert status.committed == pytest.approx(epsilon([(plan[0]["noise_multiplier"], plan[0]["sample_rate"], 200)], delta=DELTA))


def test_dataset_keys_are_hmacs_of_the_fingerprint(registry_url, tmp_path):
    reg = Registry(registry_url)
    key = reg.dataset_key(DATA["fingerprint"])
    assert key == Registry(registry_url).dataset_key(DATA["fingerprint"])  # stable for one registry
    assert DATA["fingerprint"].split(":")[1] not in key  # not the content hash itself
    assert key != Registry(tmp_path / "other.sqlite").dataset_key(DATA["fingerprint"])  # keyed per registry


def test_concurrent_admissions_are_serialised(registry_url):
    """Six runs race for a cap that fits two of them: exactly two are admitted, whatever the timing."""
    Registry(registry_url).set_cap(dataset=DATA, epsilon=4.0, delta=DELTA)
    plan, barrier, results = _plan(), threading.Barrier(6), {}

    def contender(i):
        reg = Registry(registry_url)  # each its own connection, as separate processes would have
        barrier.wait()
        try:
            _admit(reg, f"run{i}", plan)
            results[i] = True
        except BudgetExceeded:
            results[i] = False

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (status,) = Registry(registry_url).status()
    assert sum(results.values()) == len(status.runs)
    assert len(status.runs) == 2 and status.committed <= 4.0
