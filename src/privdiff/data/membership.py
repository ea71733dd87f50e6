"""Member / non-member / auxiliary splits for membership-inference attacks and defenses.

Four disjoint roles (PrivateLoRA §3, App. E; reference note §2):

* ``member_aux``    D^m_aux  — trained on; the defender's proxy and the evaluator's learned attacker see it
* ``member_test``   D^m_te   — trained on; only scored
* ``nonmember_aux`` D^nm_aux — never trained on; proxy / learned attacker see it
* ``nonmember_test``D^nm_te  — never trained on; only scored

Each role is a list of indices into one split (``train`` / ``test``) of the recipe's data set,
named by that split's content fingerprint, so a role can be re-read exactly and a changed data
set is an error. Splits are drawn once, deterministically from a seed, and written to
``RUN/splits.json``; attacks read them from there and never mix roles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_text
from .dataset import DatasetError, ImageDataset

__all__ = ["ROLES", "MEMBER_ROLES", "TRAINED_ON_MEMBERS", "MembershipSplits", "split_held_out", "split_pool", "subset"]

ROLES: tuple[str, ...] = ("member_aux", "member_test", "nonmember_aux", "nonmember_test")
MEMBER_ROLES: tuple[str, ...] = ("member_aux", "member_test")
TRAINED_ON_MEMBERS = "member_aux+member_test"  # ``trained_on`` of splits whose model saw the members only (LoRA)
_VERSION = 1


@dataclass(frozen=True)
class MembershipSplits:
    """The four roles of one run: ``roles[role] = {"split", "fingerprint", "indices"}``.

    Attributes:
        data: ``{"name", "root", "resolution"}`` of the data set the indices refer to, plus ``holdout`` and
            ``holdout_seed``, or ``test_root``, where its test split was made (:func:`_data_key`).
        seed: Seed the roles were drawn with.
        roles: Per role, the split name, that split's fingerprint and sorted int indices.
        trained_on: Which roles the model was trained on, as a description (e.g. ``"member_aux+member_test"``
            or ``"all of train"`` when every example of the training split is a member).
    """

    data: dict
    seed: int
    roles: dict[str, dict]
    trained_on: str

    def __post_init__(self) -> None:
        if set(self.roles) != set(ROLES):
            raise DatasetError(f"membership splits need roles {', '.join(ROLES)}, got {', '.join(sorted(self.roles))}")
        seen: dict[tuple[str, int], str] = {}
        for role in ROLES:
            r = self.roles[role]
            if len(r["indices"]) == 0:
                raise DatasetError(f"membership split {role} is empty")
            for i in r["indices"]:
                key = (r["fingerprint"], int(i))
                if key in seen:
                    raise DatasetError(
                        f"membership splits overlap: example {i} of {r['split']} is in {seen[key]} and {role}"
                    )
                seen[key] = role

    def source(self, split: str) -> ImageDataset:
        """The split ``split`` of the data set the roles were drawn from, read again as :attr:`data` describes it
        (a ``splits.json`` written before ``holdout``/``test_root`` were recorded reads as having neither)."""
        from . import load_dataset

        d = self.data
        return load_dataset(
            d["name"],
            root=d["root"],
            split=split,
            resolution=d["resolution"],
            holdout=d.get("holdout"),
            holdout_seed=d.get("holdout_seed", 0),
            test_root=d.get("test_root"),
        )

    def size(self, role: str) -> int:
        return len(self.roles[role]["indices"])

    def dataset(self, role: str, source: ImageDataset) -> ImageDataset:
        """The examples of ``role`` taken from ``source`` (the split it names; checked by fingerprint)."""
        r = self.roles[role]
        if source.fingerprint != r["fingerprint"] or source.split != r["split"]:
            raise DatasetError(
                f"splits.json: role {role} refers to {self.data['name']} {r['split']} {r['fingerprint'][:19]}..., "
                f"got {source.name} {source.split} {source.fingerprint[:19]}..."
            )
        return subset(source, np.asarray(r["indices"], dtype=np.int64), tag=role)

    def members(self, source: ImageDataset) -> ImageDataset:
        """D_tr = member_aux ∪ member_test of ``source`` (checked like :meth:`dataset`): what a model trained
        on the members only (a LoRA run) saw, and what its ledger describes."""
        self.dataset("member_aux", source)  # raises if source is not the split the roles were drawn from
        idx = np.asarray(sorted(self.roles["member_aux"]["indices"] + self.roles["member_test"]["indices"]))
        return subset(source, idx, tag="members")

    def unused_nonmembers(self, source: ImageDataset, *, limit: int | None = None) -> ImageDataset:
        """The examples of the non-member roles' split that are in no role: never trained on, and never
        seen by a defense's proxy or a learned attacker (both read the aux roles only). Scoring them
        with ``nonmember_test`` gives low-FPR TPRs that a few dozen non-members cannot resolve.

        Only for splits whose members come from another split, or whose model trained on the member
        roles alone (a LoRA run): otherwise the unused examples of the split may have been trained on.
        ``limit``: at most this many, a random subset drawn from the splits' seed (the same every time).
        """
        if limit is not None and limit < 1:
            raise DatasetError(f"the number of unused non-members must be >= 1, got {limit}")
        r = self.roles["nonmember_test"]
        self.dataset("nonmember_test", source)  # raises if source is not the split the role was drawn from
        if self.trained_on != TRAINED_ON_MEMBERS and r["split"] == self.roles["member_test"]["split"]:
            raise DatasetError(
                f"the model trained on {self.trained_on}: unused examples of {r['split']} may be members"
            )
        used = {
            int(i)
            for role in ROLES
            if self.roles[role]["fingerprint"] == r["fingerprint"]
            for i in self.roles[role]["indices"]
        }
        idx = np.asarray([i for i in range(len(source)) if i not in used], dtype=np.int64)
        if idx.size == 0:
            raise DatasetError(f"no unused examples left in {self.data['name']} {r['split']}: every one has a role")
        if limit is not None and limit < idx.size:
            idx = np.sort(np.random.default_rng([self.seed, 1]).permutation(idx)[:limit])
        return subset(source, idx, tag="unused_nonmembers")

    def to_dict(self) -> dict:
        return {
            "version": _VERSION,
            "data": self.data,
            "seed": self.seed,
            "trained_on": self.trained_on,
            "roles": {k: {**v, "indices": [int(i) for i in v["indices"]]} for k, v in self.roles.items()},
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "MembershipSplits":
        try:
            d = json.loads(Path(path).read_text())
            return cls(data=d["data"], seed=int(d["seed"]), roles=d["roles"], trained_on=d["trained_on"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{path}: unreadable membership splits ({type(e).__name__}: {e})") from None


def subset(dataset: ImageDataset, indices: np.ndarray, *, tag: str = "subset") -> ImageDataset:
    """``dataset[indices]`` as an :class:`ImageDataset` whose fingerprint names the parent and the indices."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(dataset)):
        raise DatasetError(f"{dataset.name} ({dataset.split}): index out of range 0..{len(dataset) - 1}")
    h = hashlib.sha256(dataset.fingerprint.encode() + tag.encode() + idx.astype("<i8").tobytes()).hexdigest()
    t = torch.from_numpy(idx)
    digests = None if dataset.example_digests is None else dataset.example_digests[idx]
    captions = None if dataset.captions is None else tuple(dataset.captions[i] for i in idx)
    return dataclasses.replace(
        dataset,
        images=dataset.images[t],
        labels=dataset.labels[t],
        fingerprint="sha256:" + h,
        example_digests=digests,
        captions=captions,
    )


def _data_key(dataset: ImageDataset, root, resolution) -> dict:
    """What :meth:`MembershipSplits.source` needs to read the parts again: the data set, where, at which
    resolution, and how a test split was made for data without one (``holdout``/``holdout_seed`` or ``test_root``)."""
    key = {"name": dataset.name, "root": root, "resolution": resolution}
    if dataset.holdout is not None:
        key.update(holdout=dataset.holdout, holdout_seed=dataset.holdout_seed)
    if dataset.test_root is not None:
        key["test_root"] = dataset.test_root
    return key


def _role(dataset: ImageDataset, idx: np.ndarray) -> dict:
    return {"split": dataset.split, "fingerprint": dataset.fingerprint, "indices": sorted(int(i) for i in idx)}


def split_held_out(
    *,
    members: ImageDataset,
    nonmembers: ImageDataset,
    seed: int,
    n_per_role: int | None = None,
    root: str | None = None,
    resolution: int | None = None,
) -> MembershipSplits:
    """Roles for a model trained on ALL of ``members`` (e.g. a DP-SGD run's training split) with
    ``nonmembers`` never seen (the held-out test split): each side is permuted with ``seed`` and
    cut into an aux half and a test half of ``n_per_role`` each (default: as many as balance allows).
    """
    if members.fingerprint == nonmembers.fingerprint:
        raise DatasetError("members and non-members are the same data set: use split_pool")
    n_max = min(len(members), len(nonmembers)) // 2
    n = n_max if n_per_role is None else n_per_role
    if not 1 <= n <= n_max:
        raise DatasetError(
            f"n_per_role must be in 1..{n_max} for {len(members)} members and {len(nonmembers)} non-members, got {n}"
        )
    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(len(members)), rng.permutation(len(nonmembers))
    roles = {
        "member_aux": _role(members, pm[:n]),
        "member_test": _role(members, pm[n : 2 * n]),
        "nonmember_aux": _role(nonmembers, pn[:n]),
        "nonmember_test": _role(nonmembers, pn[n : 2 * n]),
    }
    return MembershipSplits(
        data=_data_key(members, root, resolution),
        seed=seed,
        roles=roles,
        trained_on=f"all of {members.name} {members.split} ({len(members)} examples)",
    )


def split_pool(
    pool: ImageDataset, *, n_per_role: int, seed: int, root: str | None = None, resolution: int | None = None
) -> MembershipSplits:
    """Four disjoint roles of ``n_per_role`` examples each, drawn from one ``pool`` with ``seed``
    (PrivateLoRA's setting: the model is then trained on member_aux ∪ member_test only)."""
    if not 1 <= 4 * n_per_role <= len(pool):
        raise DatasetError(
            f"n_per_role={n_per_role}: 4 roles need {4 * n_per_role} examples, {pool.name} {pool.split} has {len(pool)}"
        )
    perm = np.random.default_rng(seed).permutation(len(pool))
    roles = {role: _role(pool, perm[i * n_per_role : (i + 1) * n_per_role]) for i, role in enumerate(ROLES)}
    return MembershipSplits(
        data=_data_key(pool, root, resolution), seed=seed, roles=roles, trained_on=TRAINED_ON_MEMBERS
    )
