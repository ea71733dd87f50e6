import numpy as np
import pytest
import torch

from privdiff.data import DatasetError, ImageDataset
from privdiff.data.membership import MEMBER_ROLES, ROLES, MembershipSplits, split_held_out, split_pool, subset


def _data(n, split, seed):
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(
        images=torch.rand(n, 1, 4, 4, generator=g) * 2 - 1,
        labels=torch.randint(0, 3, (n,), generator=g),
        num_classes=3,
        name="toy",
        split=split,
        fingerprint=f"sha256:{split}{seed}",
    )


def test_pool_roles_are_disjoint_deterministic_and_roundtrip(tmp_path):
    pool = _data(100, "train", 0)
    s = split_pool(pool, n_per_role=20, seed=3)
    assert split_pool(pool, n_per_role=20, seed=3).roles == s.roles
    assert split_pool(pool, n_per_role=20, seed=4).roles != s.roles
    idx = [i for r in ROLES for i in s.roles[r]["indices"]]
    assert len(idx) == len(set(idx)) == 80
    s.save(tmp_path / "splits.json")
    back = MembershipSplits.load(tmp_path / "splits.json")
    assert back.roles == s.roles and back.trained_on == "member_aux+member_test"
    d = back.dataset("member_test", pool)
    assert len(d) == 20 and torch.equal(d.images, pool.images[torch.tensor(s.roles["member_test"]["indices"])])
    assert d.fingerprint != pool.fingerprint


def test_held_out_uses_both_sets_and_rejects_overlap(tmp_path):
    train, test = _data(60, "train", 1), _data(30, "test", 1)
    s = split_held_out(members=train, nonmembers=test, seed=0)
    assert all(s.roles[r]["split"] == "train" for r in MEMBER_ROLES)
    assert s.size("nonmember_test") == 15 and s.size("member_aux") == 15
    with pytest.raises(DatasetError, match="refers to"):
        s.dataset("member_aux", test)  # wrong source
    with pytest.raises(DatasetError, match="overlap"):
        roles = dict(s.roles, member_test=s.roles["member_aux"])
        MembershipSplits(data=s.data, seed=0, roles=roles, trained_on="x")
    with pytest.raises(DatasetError, match="n_per_role"):
        split_held_out(members=train, nonmembers=test, seed=0, n_per_role=16)


def test_subset_fingerprint_depends_on_indices():
    pool = _data(10, "train", 2)
    assert subset(pool, np.array([1, 2])).fingerprint != subset(pool, np.array([1, 3])).fingerprint


def test_unused_nonmembers_are_the_nonmember_split_minus_every_role():
    pool = _data(100, "train", 0)
    s = split_pool(pool, n_per_role=20, seed=3)
    extra = s.unused_nonmembers(pool)
    used = {i for r in ROLES for i in s.roles[r]["indices"]}
    expected = [i for i in range(100) if i not in used]
    assert len(extra) == 20 and torch.equal(extra.images, pool.images[torch.tensor(expected)])
    # held out: the test split's examples in no role (members come from train)
    train, test = _data(60, "train", 1), _data(50, "test", 1)
    h = split_held_out(members=train, nonmembers=test, seed=0, n_per_role=10)
    assert len(h.unused_nonmembers(test)) == 30
    with pytest.raises(DatasetError, match="refers to"):
        h.unused_nonmembers(train)
    # a model trained on ALL of the split the non-members come from: its unused examples may be members
    wrong = MembershipSplits(data=s.data, seed=3, roles=s.roles, trained_on="all of toy train (100 examples)")
    with pytest.raises(DatasetError, match="may be members"):
        wrong.unused_nonmembers(pool)
    # a limit: a fixed random subset of them
    some = h.unused_nonmembers(test, limit=7)
    again = h.unused_nonmembers(test, limit=7)
    all_unused = h.unused_nonmembers(test)
    assert len(some) == 7 and torch.equal(some.images, again.images)
    assert all(any(torch.equal(x, y) for y in all_unused.images) for x in some.images)
    with pytest.raises(DatasetError, match="no unused examples"):
        split_pool(_data(80, "train", 2), n_per_role=20, seed=0).unused_nonmembers(_data(80, "train", 2))


def test_splits_of_a_held_out_folder_record_how_and_read_the_same_parts_again(tmp_path):
    """splits.json names holdout and its seed (or test_root), so an attack reads the very parts the roles index;
    a splits.json written before they were recorded still reads (as data with a test split of its own)."""
    from privdiff.data import load_dataset
    from tests.helpers import image_folder

    rng = np.random.default_rng()
    root = image_folder(tmp_path / "f", rng, classes={"a": 8, "b": 8}, size=4)
    seed = int(rng.integers(0, 2**31))
    train, test = (
        load_dataset("folder", root=root, split=s, holdout=0.25, holdout_seed=seed) for s in ("train", "test")
    )
    s = split_held_out(members=train, nonmembers=test, seed=seed, root=str(root))
    assert s.data == {"name": "folder", "root": str(root), "resolution": None, "holdout": 0.25, "holdout_seed": seed}
    s.save(tmp_path / "splits.json")
    again = MembershipSplits.load(tmp_path / "splits.json")
    for role in ROLES:  # each role's examples, read again from the split it names
        source = again.source(s.roles[role]["split"])
        assert torch.equal(
            again.dataset(role, source).images, s.dataset(role, train if role in MEMBER_ROLES else test).images
        )

    other = image_folder(tmp_path / "t", rng, classes={"b": 3}, size=4)
    members = load_dataset("folder", root=root, split="train", test_root=other)
    nonmembers = load_dataset("folder", root=root, split="test", test_root=other)
    s = split_held_out(members=members, nonmembers=nonmembers, seed=0, n_per_role=1, root=str(root))
    assert s.data["test_root"] == str(other) and s.source("test").fingerprint == nonmembers.fingerprint

    digits_train, digits_test = (load_dataset("digits", split=x) for x in ("train", "test"))
    old = split_held_out(members=digits_train, nonmembers=digits_test, seed=1, n_per_role=5)
    assert old.data == {"name": "digits", "root": None, "resolution": None}  # as every earlier splits.json
    assert old.source("test").fingerprint == old.roles["nonmember_test"]["fingerprint"]
