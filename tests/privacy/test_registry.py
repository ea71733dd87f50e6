"""The budget registry, on SQLite and on a real PostgreSQL server (same tests, both backends)."""

import hashlib
import threading
from dataclasses import replace

import dp_accounting
import pytest

from privdiff.privacy.accounting import RDP_ORDERS, epsilon
from privdiff.privacy.events import Release
from privdiff.privacy.registry import BudgetExceeded, Registry

DATA = {"name": "toy", "fingerprint": "sha256:" + hashlib.sha256(b"toy data").hexdigest(), "size": 1000}
DELTA = 1e-5


def _event(sigma, q, steps, stage="dp_sgd"):
    return Release(stage=stage, mechanism="subsampled_gaussian", noise_multiplier=sigma, sample_rate=q, steps=steps)


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
        _admit(reg, "c", [replace(_event(0.0, 0.05, 10), mechanism="non_private")])


def test_composition_across_runs_is_the_accountants(registry_url):
    reg = Registry(registry_url)
    runs = {
        "r1": [_event(1.1, 0.01, 300)],
        "r2": [_event(0.8, 0.05, 50), _event(2.0, 0.02, 100, stage="later")],
        "r3": [_event(1.5, 0.1, 20, stage="central_images"), _event(1.0, 0.02, 80)],
    }
    for run_id, events in runs.items():
        _admit(reg, run_id, events)
        reg.record(run_id=run_id, events=events)
    (status,) = reg.status()
    triples = [e.triple for ev in runs.values() for e in ev]
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
        reg.record(run_id="a", events=[plan[0].with_steps(steps)])
    assert reg.run_events("a") == [plan[0].with_steps(3)]
    # on resume a run is admitted again with what it recorded: still one run
    _admit(reg, "a", plan, recorded=[plan[0].with_steps(3)])
    (status,) = reg.status()
    assert len(status.runs) == 1 and status.runs[0].steps == 3 and not status.runs[0].complete
    assert status.committed == pytest.approx(
        epsilon([(plan[0].noise_multiplier, plan[0].sample_rate, 200)], delta=DELTA)
    )


def test_dataset_keys_are_hmacs_of_the_fingerprint(registry_url, tmp_path):
    reg = Registry(registry_url)
    key = reg.dataset_key(DATA["fingerprint"])
    assert key == Registry(registry_url).dataset_key(DATA["fingerprint"])  # stable for one registry
    assert DATA["fingerprint"].split(":")[1] not in key  # not the content hash itself
    assert key != Registry(tmp_path / "other.sqlite", create=True).dataset_key(
        DATA["fingerprint"]
    )  # keyed per registry


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


def _composed(*events):
    return epsilon([e.triple for e in events], delta=DELTA)


def test_release_turns_a_reservation_into_what_was_executed(registry_url):
    """An abandoned run (planned 200 steps, executed 30) frees the other 170, never the 30; releasing twice
    changes nothing; resuming reserves the plan again, under the cap."""
    reg = Registry(registry_url)
    reg.set_cap(dataset=DATA, epsilon=3.0, delta=DELTA)
    plan = _plan()
    _admit(reg, "crashed", plan, path="/nowhere/crashed")
    reg.record(run_id="crashed", events=[plan[0].with_steps(30)])
    with pytest.raises(BudgetExceeded):  # the crashed run's reservation leaves no room for a second run
        _admit(reg, "next", plan)
    entry, freed = reg.release(run_id="crashed")
    assert freed == [plan[0].with_steps(170)] and entry.state == "released" and entry.steps == 30
    (status,) = reg.status()
    assert status.committed == pytest.approx(_composed(plan[0].with_steps(30))) == pytest.approx(status.spent)
    assert reg.release(run_id="crashed") == (entry, [])  # nothing left to release
    _admit(reg, "next", plan)  # the freed room is usable now
    with pytest.raises(BudgetExceeded):  # resuming the released run needs its plan reserved again: no room now
        _admit(reg, "crashed", plan, recorded=[plan[0].with_steps(30)])
    (status,) = reg.status()
    assert status.committed == pytest.approx(_composed(plan[0].with_steps(30), plan[0]))


def test_release_keeps_whichever_record_counts_more_and_refuses_a_disagreement(registry_url):
    reg = Registry(registry_url)
    two = [_event(1.5, 0.1, 20, stage="central_images"), _event(1.5, 0.05, 200)]
    for run_id in ("behind", "ahead", "odd"):
        _admit(reg, run_id, two)
        reg.record(run_id=run_id, events=[two[0], two[1].with_steps(30)])
    # the ledger one step behind the registry (killed between the registry's write and the file's): the registry's 30 stay
    entry, _ = reg.release(run_id="behind", executed=[two[0], two[1].with_steps(29)])
    assert entry.events == [two[0], two[1].with_steps(30)]
    # the ledger ahead (a save the registry missed): its 31 steps are charged
    entry, _ = reg.release(run_id="ahead", executed=[two[0], two[1].with_steps(31)])
    assert entry.events == [two[0], two[1].with_steps(31)] and entry.charged == entry.events
    # each ahead in one stage: no record can be trusted to hold every spent step
    with pytest.raises(ValueError, match="disagree"):
        reg.release(run_id="odd", executed=[two[0].with_steps(21), two[1].with_steps(29)])
    with pytest.raises(ValueError, match="is not in"):
        reg.release(run_id="never-admitted")
    (status,) = reg.status()
    assert status.committed == pytest.approx(
        _composed(two[0], two[1].with_steps(30), two[0], two[1].with_steps(31), *two)
    )


def test_a_registry_made_before_release_existed_is_migrated(registry_url):
    reg = Registry(registry_url)
    _admit(reg, "old", _plan())
    with reg._transaction() as db:  # the schema of an older privdiff
        db("ALTER TABLE runs DROP COLUMN released")
    reg.close()
    reg = Registry(registry_url)
    (status,) = reg.status()
    assert status.runs[0].released is None and status.runs[0].state == "reserved"
    assert reg.release(run_id="old")[0].state == "released"


def _ledger_run(path, reg, *, run_id_steps=30):
    """A run directory whose ledger executed ``run_id_steps`` of a 200-step plan (admitted and recorded)."""
    from privdiff.privacy.ledger import Ledger

    path.mkdir()
    ledger = Ledger(delta=DELTA, accountant="rdp", dataset=DATA, target_epsilon=3.0)
    ledger.record(_event(1.5, 0.05, run_id_steps))
    ledger.save(path / "ledger.json")
    _admit(reg, ledger.run_id, _plan(), path=str(path), recorded=ledger.events)
    return ledger.run_id


def test_budget_release_command(registry_url, tmp_path, capsys):
    import fcntl
    import os

    from privdiff.cli import main

    reg = Registry(registry_url)
    run = tmp_path / "crashed"
    run_id = _ledger_run(run, reg)
    release = lambda *a: main(["budget", "release", *map(str, a), "--registry", registry_url])  # noqa: E731
    # still running: its lock is held (by another open file description, as another process's would be)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert release(run) == 2 and "in use by another privdiff process" in capsys.readouterr().err
    os.close(fd)
    assert reg.status()[0].runs[0].state == "reserved"
    # unknown: not a run, or an id the registry never saw
    assert release(tmp_path) == 2 and "no ledger.json" in capsys.readouterr().err
    assert release("0123456789abcdef") == 2 and "no run with id" in capsys.readouterr().err
    # by id prefix (as status shows it): released to its 30 executed steps
    assert release(run_id[:12]) == 0
    out = capsys.readouterr().out
    assert "170 planned steps of dp_sgd no longer reserved" in out and "released" in out
    assert reg.status()[0].committed == pytest.approx(_composed(_event(1.5, 0.05, 30)))
    assert release(run / "ledger.json") == 0 and "nothing to release" in capsys.readouterr().out
    # a run whose directory is gone: refused unless --missing-ok
    gone = tmp_path / "gone"
    gone_id = _ledger_run(gone, reg)
    (gone / "ledger.json").unlink()
    gone.rmdir()
    assert release(gone_id) == 2 and "not on this machine" in capsys.readouterr().err
    assert main(["budget", "release", gone_id, "--missing-ok", "--registry", registry_url]) == 0
    assert all(r.state == "released" for r in reg.status()[0].runs)


def test_a_crashed_training_run_is_released_then_resumed(tmp_path, tiny_overrides, capsys, monkeypatch):
    """A real tiny DPDM run dies at its second checkpoint (step 4 of 6): `budget release` charges the 4
    steps it counted; running it again reserves the rest anew and ends with registry == ledger."""
    import json

    from privdiff.cli import main
    from privdiff.runs import Run

    url, run = str(tmp_path / "registry.sqlite"), tmp_path / "run"
    Registry(url, create=True).close()
    monkeypatch.setenv("PRIVDIFF_REGISTRY", url)
    args = [
        "train",
        "dpdm-mnist5k",
        *tiny_overrides,
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "--out",
        str(run),
        "--quiet",
    ]
    save, calls = Run.save_checkpoint, []

    def dies_at_the_second(self, state):
        calls.append(state.step)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return save(self, state)

    with monkeypatch.context() as m:
        m.setattr(Run, "save_checkpoint", dies_at_the_second)
        m.setenv(
            "PRIVDIFF_TRACEBACK", "1"
        )  # the command line would print one line; here the exception itself is checked
        with pytest.raises(RuntimeError, match="power cut"):
            main(args)
    (entry,) = Registry(url).status()[0].runs
    assert entry.steps == 4 and entry.state == "reserved" and entry.reserved[0].steps == 2
    assert main(["budget", "release", str(run), "--registry", url]) == 0
    (status,) = Registry(url).status()
    ledger = json.loads((run / "ledger.json").read_text())
    assert status.runs[0].state == "released" and status.committed == pytest.approx(ledger["epsilon"])
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err  # resumed from step 2: steps 2-3 replayed, not counted again
    (entry,) = Registry(url).status()[0].runs
    ledger = json.loads((run / "ledger.json").read_text())
    assert entry.state == "complete" and entry.steps == 6 == ledger["events"][0]["steps"]
    assert [{k: e[k] for k in ("stage", "noise_multiplier", "sample_rate", "steps")} for e in ledger["events"]] == [
        {k: getattr(e, k) for k in ("stage", "noise_multiplier", "sample_rate", "steps")} for e in entry.events
    ]


# -- issue 22: a registry is created only on request; a typo is an error, never a fresh registry without caps --

import math  # noqa: E402
import sqlite3  # noqa: E402

from privdiff.privacy.registry import RegistryError  # noqa: E402


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _cli(argv) -> int:
    from privdiff.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse's refusals
        return e.code


def test_a_given_registry_that_does_not_exist_is_refused_not_created(tmp_path, monkeypatch):
    for missing in (tmp_path / "typo.sqlite", tmp_path / "no" / "such" / "dir" / "registry.sqlite"):
        with pytest.raises(RegistryError, match="no budget registry at .*privdiff budget init"):
            Registry(missing)
        monkeypatch.setenv("PRIVDIFF_REGISTRY", str(missing))
        with pytest.raises(RegistryError, match="no budget registry"):
            Registry()
        with pytest.raises(RegistryError):
            Registry(f"sqlite:///{missing}")
    assert list(tmp_path.iterdir()) == []  # neither file nor directory was made
    # created on request (its directory too), then opened like any other
    made = tmp_path / "team" / "registry.sqlite"
    reg = Registry(made, create=True)
    assert reg.created and made.is_file()
    reg.set_cap(dataset=DATA, epsilon=3.0, delta=DELTA)
    reg.close()
    again = Registry(made, create=True)  # asking again changes nothing
    assert not again.created and again.status()[0].cap_epsilon == 3.0
    monkeypatch.setenv("PRIVDIFF_REGISTRY", str(made))
    assert Registry().status()[0].cap_epsilon == 3.0


def test_privdiffs_own_default_location_is_created_on_first_use(tmp_path, monkeypatch):
    monkeypatch.delenv("PRIVDIFF_REGISTRY")
    monkeypatch.setenv("HOME", str(tmp_path))
    reg = Registry()
    assert reg.created and (tmp_path / ".privdiff" / "registry.sqlite").is_file()


@pytest.mark.parametrize(
    "url, says",
    [
        ("postgresq://user@host/db", "unknown budget registry scheme 'postgresq://'"),
        ("mysql://host/db", "unknown budget registry scheme"),
        ("file:///tmp/registry.sqlite", "unknown budget registry scheme"),
        ("http://host/registry", "unknown budget registry scheme"),
        ("sqlite://relative.sqlite", "sqlite:///PATH"),
        ("", "is empty"),
        ("   ", "is empty"),
    ],
)
def test_an_unknown_scheme_or_an_empty_location_is_an_error(url, says, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegistryError, match=says):
        Registry(url, create=True)
    monkeypatch.setenv("PRIVDIFF_REGISTRY", url)
    with pytest.raises(RegistryError, match=says):
        Registry()
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_is_not_a_registry_is_refused_and_left_as_it_was(tmp_path):
    with pytest.raises(RegistryError, match="is a directory"):
        Registry(tmp_path)
    with pytest.raises(RegistryError, match="is a directory"):
        Registry(tmp_path, create=True)
    text = tmp_path / "notes.txt"
    text.write_text("my notes, not a database\n")
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    other = tmp_path / "other-app.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE things (x)")
    conn.close()
    before = {p: p.read_bytes() for p in (text, empty, other)}
    for path, says in (
        (text, "not a SQLite database"),
        (empty, "not a privdiff budget registry"),
        (other, "not a privdiff budget registry"),
    ):
        with pytest.raises(RegistryError, match=says) as e:
            Registry(path)
        assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty.sqlite",
        "notes.txt",
        "other-app.sqlite",
    ]  # no -wal, -shm


def test_a_refused_postgresql_connection_is_one_line_without_the_password():
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RegistryError, match="cannot connect to the budget registry") as e:
        Registry(f"postgresql://alice:hunter2secret@127.0.0.1:{port}/budget?connect_timeout=5")
    assert "\n" not in str(e.value) and "hunter2secret" not in str(e.value) and "alice" not in str(e.value)
    with pytest.raises(RegistryError) as e:
        Registry(f"postgres://alice:hunter2secret@127.0.0.1:{port}/budget?connect_timeout=5")
    assert "hunter2secret" not in str(e.value)


def test_a_postgresql_database_without_the_tables_is_not_a_registry(postgres_server):
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    with pytest.raises(RegistryError, match="not a privdiff budget registry"):
        Registry(f"{postgres_server}/{name}")
    assert Registry(f"{postgres_server}/{name}", create=True).created
    assert not Registry(f"{postgres_server}/{name}").created


def test_set_cap_refuses_a_nan_cap_and_a_delta_outside_0_1(registry_url):
    reg = Registry(registry_url)
    reg.set_cap(dataset=DATA, epsilon=3.0, delta=DELTA)
    for eps, delta in (
        (math.nan, DELTA),
        (math.inf, DELTA),
        (0.0, DELTA),
        (-1.0, DELTA),
        (3.0, 2.0),
        (3.0, 1.0),
        (3.0, 0.0),
        (3.0, math.nan),
    ):
        with pytest.raises(ValueError):
            reg.set_cap(dataset=DATA, epsilon=eps, delta=delta)
    (status,) = reg.status()
    assert status.cap_epsilon == 3.0 and status.delta == DELTA  # unchanged: a NaN never removes a cap


# the command line: one line on stderr, exit 2, nothing created or changed

MICRO_DATA = ["data.name=digits", "data.resolution=4"]


def test_budget_init_then_the_commands_use_it(tmp_path, capsys):
    url = str(tmp_path / "shared" / "registry.sqlite")
    assert _cli(["budget", "status", "--registry", url]) == 2
    assert "no budget registry at" in _one_line_error(capsys) and not (tmp_path / "shared").exists()
    assert _cli(["budget", "cap", "dpdm-mnist5k", *MICRO_DATA, "--epsilon", "5", "--registry", url]) == 2
    assert "privdiff budget init" in _one_line_error(capsys) and not (tmp_path / "shared").exists()
    assert _cli(["budget", "init", "--registry", url]) == 0
    assert "created" in capsys.readouterr().out
    assert _cli(["budget", "init", "--registry", url]) == 0
    assert "already a budget registry" in capsys.readouterr().out
    assert _cli(["budget", "cap", "dpdm-mnist5k", *MICRO_DATA, "--epsilon", "5", "--registry", url]) == 0
    assert "cap epsilon=5" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, says",
    [
        (["--epsilon", "nan"], "--epsilon"),
        (["--epsilon", "inf"], "--epsilon"),
        (["--epsilon", "-1"], "--epsilon"),
        (["--epsilon", "0"], "--epsilon"),
        (["--epsilon", "4", "--delta", "2"], "--delta"),
        (["--epsilon", "4", "--delta", "1"], "--delta"),
        (["--epsilon", "4", "--delta", "nan"], "--delta"),
        (["--epsilon", "4", "privacy.delta=2"], "privacy.delta"),
    ],
)
def test_budget_cap_with_a_nonsense_value_changes_nothing(args, says, capsys):
    """`budget cap --epsilon nan` used to remove an existing cap, `--delta 2` was stored."""
    assert _cli(["budget", "cap", "dpdm-mnist5k", *MICRO_DATA, "--epsilon", "3"]) == 0
    capsys.readouterr()
    assert _cli(["budget", "cap", "dpdm-mnist5k", *MICRO_DATA, *args]) == 2
    assert says in _one_line_error(capsys)
    (status,) = Registry().status()
    assert status.cap_epsilon == 3.0 and status.delta == 1e-5


@pytest.mark.parametrize(
    "location", ["{tmp}/typo.sqlite", "{tmp}/missing-dir/registry.sqlite", "postgresq://h/db", "{tmp}"]
)
def test_train_with_a_registry_typo_is_refused_before_anything_is_written(location, tmp_path, monkeypatch, capsys):
    location = location.format(tmp=tmp_path / "reg")
    (tmp_path / "reg").mkdir()
    monkeypatch.setenv("PRIVDIFF_REGISTRY", location)
    out = tmp_path / "run"
    assert _cli(["train", "dpdm-mnist5k", *MICRO_DATA, "--out", str(out), "--quiet"]) == 2
    assert "registry" in _one_line_error(capsys)
    assert not out.exists() and list((tmp_path / "reg").iterdir()) == []
