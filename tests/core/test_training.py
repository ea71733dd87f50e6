import math

import pytest

from privdiff.config import resolve_recipe
from privdiff.methods.budget import planned_steps
from privdiff.methods.stages import learning_rate


def test_planned_steps_are_epochs_over_sample_rate():
    r = resolve_recipe(None, ["train.batch_size=250", "train.epochs=55"])
    assert planned_steps(r.train, 4000) == 880


def test_cosine_schedule_depends_only_on_the_step():
    r = resolve_recipe(None, ["train.lr=0.003", "train.lr_schedule=cosine"])
    total = 880
    lrs = [learning_rate(r.train, s, total) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.003)
    assert lrs[total // 2] == pytest.approx(0.003 * (0.05 + 0.95 * 0.5))
    assert lrs[-1] == pytest.approx(0.003 * 0.05)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    assert learning_rate(r.train, 10 * total, total) == pytest.approx(0.003 * 0.05)  # past the plan: floor


def test_constant_schedule():
    r = resolve_recipe(None, ["train.lr=0.01"])
    assert {learning_rate(r.train, s, 100) for s in (0, 50, 100)} == {0.01}
    assert not math.isnan(learning_rate(r.train, 0, 1))
