"""The privacy ledger: record/merge, ε of its events, atomic save/load, recomputation from JSON."""

from __future__ import annotations

import json
import math

import pytest

from privdiff.privacy import accounting
from privdiff.privacy.ledger import NON_PRIVATE, SUBSAMPLED_GAUSSIAN, Ledger, Release

DATASET = {"name": "mnist", "fingerprint": "sha256:0123abcd", "size": 60000}


def make_ledger(accountant: str = "rdp") -> Ledger:
    return Ledger(delta=1e-5, accountant=accountant, dataset=dict(DATASET), target_epsilon=3.0)


def sgd(ledger: Ledger, steps: int = 1, sigma: float = 1.1, q: float = 256 / 60000, C: float = 1.0, stage="train"):
    ledger.record(
        Release(
            stage=stage,
            mechanism=SUBSAMPLED_GAUSSIAN,
            noise_multiplier=sigma,
            sample_rate=q,
            max_grad_norm=C,
            steps=steps,
        )
    )


def test_record_merges_only_identical_consecutive_events():
    led = make_ledger()
    for _ in range(5):
        sgd(led)
    sgd(led, steps=10)
    assert len(led.events) == 1 and led.events[0].steps == 15
    sgd(led, sigma=1.2)  # different noise: new event
    sgd(led, C=0.5)  # different clipping norm: new event
    sgd(led, sigma=1.1)  # same as the first event, but not consecutive: new event
    led.record(
        Release(stage="release", mechanism=SUBSAMPLED_GAUSSIAN, noise_multiplier=20.0, sample_rate=1.0, sensitivity=2.0)
    )
    assert [e.steps for e in led.events] == [15, 1, 1, 1, 1]
    assert led.steps("train") == 18 and led.steps("release") == 1 and led.steps("other") == 0
    assert led.events[-1].sensitivity == 2.0 and led.events[-1].max_grad_norm is None
    assert led.events[0].to_dict() == {
        "stage": "train",
        "mechanism": SUBSAMPLED_GAUSSIAN,
        "noise_multiplier": 1.1,
        "sample_rate": 256 / 60000,
        "max_grad_norm": 1.0,
        "sensitivity": None,
        "steps": 15,
    }


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_accounting_of_events(accountant):
    led = make_ledger(accountant)
    assert led.epsilon() == 0.0  # nothing released yet
    led.record(
        Release(stage="release", mechanism=SUBSAMPLED_GAUSSIAN, noise_multiplier=20.0, sample_rate=1.0, sensitivity=1.0)
    )
    sgd(led, steps=700)
    sgd(led, steps=300, sigma=1.5)
    history = [(20.0, 1.0, 1), (1.1, 256 / 60000, 700), (1.5, 256 / 60000, 300)]
    assert led.history() == history
    assert led.epsilon() == accounting.epsilon(history, delta=1e-5, accountant=accountant)
    extra = [(1.1, 256 / 60000, 500)]
    assert led.epsilon(extra=extra) == accounting.epsilon(history + extra, delta=1e-5, accountant=accountant)
    assert led.epsilon(extra=extra) > led.epsilon()
    assert len(led.events) == 3  # a hypothetical extra is not recorded


def test_merged_steps_cost_the_same_as_separate_steps():
    merged, separate = make_ledger(), make_ledger()
    for _ in range(50):
        sgd(merged)
    sgd(separate, steps=50)
    assert merged.events == separate.events
    assert merged.epsilon() == pytest.approx(accounting.epsilon([(1.1, 256 / 60000, 50)], delta=1e-5))


def test_save_load_round_trip(tmp_path):
    led = make_ledger()
    led.record(
        Release(stage="release", mechanism=SUBSAMPLED_GAUSSIAN, noise_multiplier=20.0, sample_rate=1.0, sensitivity=1.0)
    )
    sgd(led, steps=1234)
    path = tmp_path / "run" / "ledger.json"
    led.save(path)
    d = json.loads(path.read_text())  # a complete, valid JSON document
    assert d["epsilon"] == pytest.approx(led.epsilon(), rel=1e-12)
    assert d["private"] is True and d["delta"] == 1e-5 and d["accountant"] == "rdp"
    assert d["dataset"] == DATASET and d["target_epsilon"] == 3.0
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temporary file left behind

    back = Ledger.load(path)
    assert back == led
    assert back.epsilon() == led.epsilon()
    # recording goes on where it left off (merges into the last event)
    sgd(back, steps=6)
    assert back.events[-1].steps == 1240
    # saving again replaces the file atomically with the new state
    back.save(path)
    assert json.loads(path.read_text())["events"][-1]["steps"] == 1240


def test_epsilon_recomputable_from_saved_events_alone(tmp_path):
    led = make_ledger("prv")
    sgd(led, steps=400)
    sgd(led, steps=100, sigma=0.9, q=0.01)
    path = tmp_path / "ledger.json"
    led.save(path)
    d = json.loads(path.read_text())
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in d["events"]]
    assert accounting.epsilon(history, delta=d["delta"], accountant=d["accountant"]) == d["epsilon"]


def test_non_private_event_is_infinite_and_null_in_json(tmp_path):
    led = Ledger(delta=1e-5, accountant="rdp", dataset=dict(DATASET), target_epsilon=None)
    sgd(led, steps=10)
    assert math.isfinite(led.epsilon()) and led.private
    led.record(Release(stage="train", mechanism=NON_PRIVATE, noise_multiplier=0.0, sample_rate=0.01, steps=5))
    assert not led.private
    assert led.epsilon() == math.inf
    path = tmp_path / "ledger.json"
    led.save(path)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    d = json.loads(text)
    assert d["epsilon"] is None and d["private"] is False and d["target_epsilon"] is None
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in d["events"]]
    assert accounting.epsilon(history, delta=d["delta"]) == math.inf  # the events alone say the same
    assert Ledger.load(path).epsilon() == math.inf


def test_load_rejects_what_is_not_a_ledger(tmp_path):
    bad = tmp_path / "ledger.json"
    bad.write_text('{"delta": 1e-5')  # truncated
    with pytest.raises(ValueError, match="not a privdiff ledger"):
        Ledger.load(bad)
    bad.write_text('{"delta": 1e-5, "accountant": "rdp"}')  # missing keys
    with pytest.raises(ValueError, match="not a privdiff ledger"):
        Ledger.load(bad)
    with pytest.raises(FileNotFoundError):
        Ledger.load(tmp_path / "missing.json")


# -- the typed event ------------------------------------------------------------------------------


def _random_release(rng) -> Release:
    return Release(
        stage="dp_sgd",
        mechanism=SUBSAMPLED_GAUSSIAN,
        noise_multiplier=float(rng.uniform(0.3, 5)),
        sample_rate=float(rng.uniform(1e-4, 1)),
        steps=int(rng.integers(1, 10_000)),
        max_grad_norm=float(rng.uniform(0.1, 10)),
    )


def test_a_release_is_a_value_with_the_ledger_files_keys():
    import numpy as np

    rng = np.random.default_rng()
    r = _random_release(rng)
    d = r.to_dict()
    assert list(d) == ["stage", "mechanism", "noise_multiplier", "sample_rate", "max_grad_norm", "sensitivity", "steps"]
    assert Release.from_dict(json.loads(json.dumps(d))) == r and hash(r) == hash(Release.from_dict(d))
    assert r.triple == (d["noise_multiplier"], d["sample_rate"], d["steps"])
    assert r.same_mechanism(r.with_steps(r.steps + 7)) and not r.same_mechanism(_random_release(rng))
    with pytest.raises(AttributeError):
        r.steps = 1  # frozen
    # a ledger written before max_grad_norm / sensitivity were recorded still loads
    old = {k: d[k] for k in ("stage", "mechanism", "noise_multiplier", "sample_rate", "steps")}
    assert Release.from_dict(old) == Release(**old)


@pytest.mark.parametrize(
    "bad",
    [
        {"noise_multiplier": -1.0},
        {"noise_multiplier": float("nan")},
        {"sample_rate": 1.5},
        {"steps": 2.5},
        {"steps": True},
        {"mechanism": "laplace"},
        {"stage": ""},
        {"max_grad_norm": float("inf")},
        {"unknown_key": 1},
    ],
)
def test_a_release_out_of_range_is_refused_and_a_ledger_holding_one_is_damaged(tmp_path, bad):
    good = {
        "stage": "dp_sgd",
        "mechanism": SUBSAMPLED_GAUSSIAN,
        "noise_multiplier": 1.1,
        "sample_rate": 0.01,
        "steps": 3,
    }
    with pytest.raises(ValueError):
        Release.from_dict({**good, **bad})
    led = make_ledger()
    sgd(led, steps=3)
    path = tmp_path / "ledger.json"
    led.save(path)
    d = json.loads(path.read_text())
    d["events"][0].update(bad)
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not a privdiff ledger, or damaged"):
        Ledger.load(path)
