"""Budget identity that follows the data, not its file format (issue 23, item 4): the registry knows each
run's examples by a keyed hash of their pixels, so the same images as IDX, a PNG folder, a zip, or a subset
of them, count against one cap; disjoint data is separate (SQLite and a real PostgreSQL server)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest

from privdiff.data import load_dataset
from privdiff.privacy.accounting import epsilon
from privdiff.privacy.budget import data_identity, registry_examples
from privdiff.privacy.events import Release
from privdiff.privacy.registry import BudgetExceeded, Registry, RegistryError, format_status
from tests.helpers import random_digits, write_folder, write_idx, write_zip

DELTA = 1e-5
TOY = {"name": "toy", "fingerprint": "sha256:" + hashlib.sha256(b"toy data").hexdigest(), "size": 1000}
OLD_REGISTRY = Path(__file__).parent / "data" / "registry-before-examples.sqlite"  # made by privdiff 5216fc7


def _event(steps: int = 200) -> Release:
    """ε 2.60 alone (RDP, δ 1e-5); two compose to 3.69."""
    return Release(stage="dp_sgd", mechanism="subsampled_gaussian", noise_multiplier=1.5, sample_rate=0.05, steps=steps)


def _composed(n: int) -> float:
    return epsilon([_event().triple] * n, delta=DELTA)


def _admit(reg: Registry, run_id: str, ds) -> float:
    return reg.admit(
        run_id=run_id,
        dataset=data_identity(ds),
        planned=[_event()],
        delta=DELTA,
        accountant="rdp",
        examples=registry_examples(reg, ds),
    )


@pytest.fixture
def exports(tmp_path):
    """40 fresh random digits as IDX files, a PNG folder and its zip; its first 15 as a folder of their own
    (a subset); its halves; 20 other random digits (disjoint)."""
    rng = np.random.default_rng()
    images, labels = random_digits(rng, 40)
    other, other_labels = random_digits(rng, 20)
    folder = write_folder(tmp_path / "pngs", images, labels)
    return {
        "idx": load_dataset("mnist", root=write_idx(tmp_path / "idx", images, labels)),
        "folder": load_dataset("folder", root=folder),
        "zip": load_dataset("folder", root=write_zip(folder, tmp_path / "pngs.zip")),
        "subset": load_dataset("folder", root=write_folder(tmp_path / "some", images[:15], labels[:15])),
        "first": load_dataset("mnist", root=write_idx(tmp_path / "first", images[:20], labels[:20])),
        "second": load_dataset("mnist", root=write_idx(tmp_path / "second", images[20:], labels[20:])),
        "disjoint": load_dataset("folder", root=write_folder(tmp_path / "other", other, other_labels)),
    }


def test_idx_folder_and_zip_of_the_same_images_are_one_data_set(registry_url, exports):
    reg = Registry(registry_url)
    for name in ("idx", "folder", "zip"):
        _admit(reg, name, exports[name])
    (status,) = reg.status()
    assert sorted(r.run_id for r in status.runs) == ["folder", "idx", "zip"]
    assert status.committed == pytest.approx(_composed(3))
    assert status.sources == ["folder", "mnist"] and status.size == 40
    assert "one data set across folder, mnist" in format_status([status])
    assert [s.key for s in reg.status("mnist")] == [s.key for s in reg.status("folder")] == [status.key]


def test_a_subset_composes_with_the_whole_and_disjoint_data_is_separate(registry_url, exports):
    reg = Registry(registry_url)
    _admit(reg, "whole", exports["folder"])
    _admit(reg, "subset", exports["subset"])
    _admit(reg, "other", exports["disjoint"])
    statuses = reg.status()
    assert sorted(len(s.runs) for s in statuses) == [1, 2]
    whole = next(s for s in statuses if len(s.runs) == 2)
    assert whole.committed == pytest.approx(_composed(2)) and whole.size == 40
    other = next(s for s in statuses if len(s.runs) == 1)
    assert other.committed == pytest.approx(_composed(1)) and other.size == 20


def test_a_superset_merges_the_data_sets_it_overlaps_on_the_strictest_terms(registry_url, exports):
    reg = Registry(registry_url)
    reg.set_cap(
        dataset=data_identity(exports["first"]),
        epsilon=9.0,
        delta=DELTA,
        examples=registry_examples(reg, exports["first"]),
    )
    reg.set_cap(dataset=data_identity(exports["second"]), epsilon=8.0, delta=1e-3, accountant="prv")
    _admit(reg, "first", exports["first"])
    _admit(reg, "second", exports["second"])
    assert len(reg.status()) == 2
    _admit(reg, "whole", exports["zip"])  # both halves: one data set now
    (status,) = reg.status()
    assert sorted(r.run_id for r in status.runs) == ["first", "second", "whole"]
    assert (status.cap_epsilon, status.delta, status.accountant) == (8.0, DELTA, "rdp")
    assert status.committed == pytest.approx(_composed(3))


def test_a_run_that_the_overlap_takes_past_the_cap_is_refused_and_merges_nothing(registry_url, exports):
    reg = Registry(registry_url)
    folder = exports["folder"]
    reg.set_cap(dataset=data_identity(folder), epsilon=3.0, delta=DELTA, examples=registry_examples(reg, folder))
    _admit(reg, "idx", exports["idx"])  # the IDX copy counts against the folder's cap
    for name in ("zip", "subset"):
        with pytest.raises(BudgetExceeded, match="over its cap 3"):
            _admit(reg, name, exports[name])
    _admit(reg, "other", exports["disjoint"])  # other images: their own budget
    capped = next(s for s in reg.status() if s.cap_epsilon == 3.0)
    assert [r.run_id for r in capped.runs] == ["idx"] and capped.committed == pytest.approx(_composed(1))


def test_a_run_on_two_capped_data_sets_is_refused_and_they_stay_two(registry_url, exports):
    reg = Registry(registry_url)
    for half in ("first", "second"):
        ds = exports[half]
        reg.set_cap(dataset=data_identity(ds), epsilon=3.0, delta=DELTA, examples=registry_examples(reg, ds))
        _admit(reg, half, ds)
    with pytest.raises(BudgetExceeded, match="over its cap 3"):
        _admit(reg, "whole", exports["folder"])
    assert sorted(len(s.runs) for s in reg.status()) == [1, 1] and all(s.sources == ["mnist"] for s in reg.status())


def test_the_example_key_lives_beside_the_registry_with_mode_0600(tmp_path, monkeypatch, exports):
    monkeypatch.delenv("PRIVDIFF_EXAMPLE_KEY_FILE")
    url = tmp_path / "reg" / "registry.sqlite"
    reg = Registry(url, create=True)
    examples = registry_examples(reg, exports["folder"])
    key = url.with_name("registry.sqlite.key")
    assert reg.example_key_path == key and stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = key.read_text().strip()
    assert secret not in url.read_bytes().decode("latin-1")  # never in the database
    assert len(examples) == 40 and all(len(h) == 64 for h in examples)
    assert examples == Registry(url).key_examples(exports["zip"].example_digests)  # stable for the key
    other = Registry(tmp_path / "other.sqlite", create=True)
    assert not set(other.key_examples(exports["folder"].example_digests)) & set(examples)  # keyed per registry
    reg.close()
    # a machine without the key, or with another one, is refused: never every example new
    key.rename(tmp_path / "moved")
    with pytest.raises(RegistryError, match="not on this machine"):
        Registry(url).key_examples(exports["folder"].example_digests)
    monkeypatch.setenv("PRIVDIFF_EXAMPLE_KEY_FILE", str(tmp_path / "other.sqlite.key"))
    with pytest.raises(RegistryError, match="is not the example key"):
        Registry(url).key_examples(exports["folder"].example_digests)
    monkeypatch.delenv("PRIVDIFF_EXAMPLE_KEY_FILE")
    (tmp_path / "moved").rename(key)
    os.chmod(key, 0o644)
    with pytest.raises(RegistryError, match="chmod 600"):
        Registry(url).key_examples(exports["folder"].example_digests)


def _old_schema(url: str) -> None:
    """Make the registry at ``url`` one of privdiff 5216fc7 (before examples): its schema, a capped data set
    ``toy`` (ε 3) and a run that reserved 200 steps and recorded 120."""
    key = Registry(url).dataset_key(TOY["fingerprint"])
    with Registry(url)._transaction() as db:
        hmac_key = db("SELECT value FROM meta WHERE name = 'hmac_key'")[0][0]
        for table in ("events", "runs", "examples", "datasets", "meta"):
            db(f"DROP TABLE {table}")
        db("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db(
            "CREATE TABLE datasets (key TEXT PRIMARY KEY, name TEXT NOT NULL, size BIGINT, cap_epsilon DOUBLE PRECISION, "
            "delta DOUBLE PRECISION NOT NULL, accountant TEXT NOT NULL)"
        )
        db(
            "CREATE TABLE runs (run_id TEXT PRIMARY KEY, dataset_key TEXT NOT NULL REFERENCES datasets(key), path TEXT, "
            "planned TEXT NOT NULL, target_epsilon DOUBLE PRECISION, delta DOUBLE PRECISION, accountant TEXT, "
            "created TEXT NOT NULL, updated TEXT NOT NULL, released TEXT)"
        )
        db(
            "CREATE TABLE events (run_id TEXT NOT NULL REFERENCES runs(run_id), seq BIGINT NOT NULL, stage TEXT NOT NULL, "
            "mechanism TEXT NOT NULL, noise_multiplier DOUBLE PRECISION NOT NULL, sample_rate DOUBLE PRECISION NOT NULL, "
            "steps BIGINT NOT NULL, PRIMARY KEY (run_id, seq))"
        )
        db("INSERT INTO meta VALUES ('hmac_key', ?)", (hmac_key,))
        db("INSERT INTO datasets VALUES (?, 'toy', 1000, 3.0, ?, 'rdp')", (key, DELTA))
        planned = json.dumps([_event().to_dict()])
        db(
            "INSERT INTO runs VALUES ('old-run', ?, '/gone/old-run', ?, NULL, ?, 'rdp', 't', 't', NULL)",
            (key, planned, DELTA),
        )
        e = _event(120)
        db(
            "INSERT INTO events VALUES ('old-run', 0, 'dp_sgd', ?, ?, ?, ?)",
            (e.mechanism, e.noise_multiplier, e.sample_rate, e.steps),
        )


def _old_registry_keeps_its_cap(url: str) -> None:
    reg = Registry(url)
    (status,) = reg.status()
    assert (status.name, status.cap_epsilon, status.size) == ("toy", 3.0, 1000)
    assert [(r.run_id, r.steps, r.state) for r in status.runs] == [("old-run", 120, "reserved")]
    assert status.committed == pytest.approx(_composed(1))
    rng = np.random.default_rng()
    digests = rng.integers(0, 256, size=(1000, 32), dtype=np.uint8)
    examples = reg.key_examples(digests)
    with pytest.raises(BudgetExceeded, match="over its cap 3"):  # the same data, now with its examples
        reg.admit(run_id="new", dataset=TOY, planned=[_event()], delta=DELTA, accountant="rdp", examples=examples)
    # naming it attaches its examples; then a re-export (another fingerprint, the same examples) composes with it
    reg.name_dataset(dataset=TOY, name="toys", examples=examples, delta=DELTA)
    export = {"name": "folder", "fingerprint": "sha256:" + "ab" * 32, "size": 1000}
    with pytest.raises(BudgetExceeded, match="data set toys would reach"):
        reg.admit(
            run_id="copy", dataset=export, planned=[_event()], delta=DELTA, accountant="rdp", examples=examples[::3]
        )
    reg.admit(
        run_id="small", dataset=export, planned=[_event(1)], delta=DELTA, accountant="rdp", examples=examples[::3]
    )
    (status,) = reg.status("toys")
    assert sorted(r.run_id for r in status.runs) == ["old-run", "small"] and status.cap_epsilon == 3.0
    assert status.sources == ["folder", "toy"]


def test_a_registry_file_of_the_previous_privdiff_opens_and_keeps_its_caps(tmp_path):
    path = tmp_path / "registry.sqlite"
    shutil.copyfile(OLD_REGISTRY, path)
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "examples" not in tables  # as it was made
    _old_registry_keeps_its_cap(str(path))


def test_an_old_schema_is_migrated_on_both_backends(registry_url):
    _old_schema(registry_url)
    _old_registry_keeps_its_cap(registry_url)


def test_budget_name_and_status_commands(tmp_path, capsys, monkeypatch, exports):
    from privdiff.cli import main

    url = os.environ["PRIVDIFF_REGISTRY"]
    data = ["data.name=folder", f"data.root={tmp_path / 'pngs'}"]
    assert main(["budget", "name", "dpdm-mnist5k", "my digits", *data]) == 0, capsys.readouterr().err
    assert "dataset my digits [folder] (40 examples" in capsys.readouterr().out
    _admit(Registry(url), "idx-run", exports["idx"])
    assert main(["budget", "status", "--dataset", "my digits"]) == 0
    out = capsys.readouterr().out
    assert "dataset my digits [folder]" in out and "one data set across folder, mnist" in out and "1 runs" in out
    assert (
        main(["budget", "name", "dpdm-mnist5k", "my digits", "data.name=folder", f"data.root={tmp_path / 'other'}"])
        == 2
    )
    assert "already named 'my digits'" in capsys.readouterr().err


def test_a_reexport_is_refused_by_train_before_it_reads_data(tmp_path, tiny_overrides, capsys):
    """End to end: a cap on the PNG folder; a run on its zip is admitted; a run on the IDX copy of the same
    images would pass the cap and is refused before training, leaving nothing behind; the ledger holds a
    keyed digest of the run's examples and none of the per-example hashes."""
    from privdiff.cli import main

    images, labels = random_digits(np.random.default_rng(), 64)
    folder = write_folder(tmp_path / "pngs", images, labels)
    zipped = write_zip(folder, tmp_path / "pngs.zip")
    idx = write_idx(tmp_path / "idx", images, labels)
    common = [*tiny_overrides, "privacy.epsilon=5"]  # 2 steps of 32 of 64 images at epsilon 5
    assert main(["budget", "cap", "dpdm-mnist5k", "data.name=folder", f"data.root={folder}", "--epsilon", "6"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "dpdm-mnist5k",
                *common,
                "data.name=folder",
                f"data.root={zipped}",
                "--out",
                str(tmp_path / "a"),
                "--quiet",
            ]
        )
        == 0
    )
    ledger = json.loads((tmp_path / "a" / "ledger.json").read_text())
    assert ledger["dataset"]["examples"].startswith("hmac-sha256:")
    reg = Registry(os.environ["PRIVDIFF_REGISTRY"])
    hashes = registry_examples(reg, load_dataset("folder", root=zipped))
    text = (tmp_path / "a" / "ledger.json").read_text()
    assert not any(h in text for h in hashes)
    capsys.readouterr()
    code = main(
        [
            "train",
            "dpdm-mnist5k",
            *common,
            "data.name=mnist",
            f"data.root={idx}",
            "--out",
            str(tmp_path / "b"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "over its cap 6" in err, err
    assert not (tmp_path / "b" / "ledger.json").exists() and not (tmp_path / "b" / "checkpoints").exists()
    assert main(["budget", "status"]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("dataset folder (64 examples") and out.count("dataset ") == 1 and "1 runs" in out
    )  # zip = folder
