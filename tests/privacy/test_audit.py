"""The one-run privacy audit: its bound against hand computation, and on real tiny DP-SGD runs."""

import json
import math

import pytest

from privdiff.cli import main
from privdiff.privacy.audit import epsilon_lower_bound


def test_bound_all_guesses_right_is_the_hand_computed_binomial_case():
    # r = 10 guesses, all right: P[Bin(10, p) >= 10] = p^10 = 0.05  =>  p = 0.05^(1/10), eps = log(p / (1 - p))
    p = 0.05 ** 0.1
    assert epsilon_lower_bound(correct=10, guesses=10, canaries=10) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_bound_nine_of_ten_against_the_binomial_polynomial():
    # P[Bin(10, p) >= 9] = 10 p^9 (1 - p) + p^10: solve = 0.05 - m*delta by bisection on p, by hand
    m, delta = 100, 1e-4
    lo, hi = 0.5, 1.0
    for _ in range(100):
        p = (lo + hi) / 2
        lo, hi = (lo, p) if 10 * p**9 * (1 - p) + p**10 > 0.05 - m * delta else (p, hi)
    assert epsilon_lower_bound(correct=9, guesses=10, canaries=m, delta=delta) == pytest.approx(math.log(lo / (1 - lo)), abs=1e-5)


def test_bound_is_zero_when_chance_explains_the_guesses():
    assert epsilon_lower_bound(correct=58, guesses=100, canaries=100) == 0.0  # P[Bin(100, 1/2) >= 58] = 0.067 > 0.05
    assert epsilon_lower_bound(correct=60, guesses=100, canaries=100) > 0.0  # ... >= 60: 0.028
    assert epsilon_lower_bound(correct=70, guesses=100, canaries=100) > 0.0
    with pytest.raises(ValueError, match="m\\*delta"):
        epsilon_lower_bound(correct=10, guesses=10, canaries=10_000, delta=1e-5)


# a 4x4 one-level DPDM on sklearn's digits: q = 512/1437, 8 steps, claimed epsilon 1 (calibrated for those 8 steps);
# 500 canaries: a perfect attack reaches a bound of about 3.1, a correct run about 0.3
AUDIT = ["data.name=digits", "data.resolution=4", "model.channels=[4]", "model.attention_levels=[]", "model.norm_num_groups=2",
         "model.attention_head_dim=4", "train.batch_size=512", "train.epochs=2.85", "privacy.noise_multiplicity=1",
         "train.max_physical_batch_size=1024", "privacy.epsilon=1"]


@pytest.fixture(autouse=True)
def _deterministic_kernels():
    """One per-example kernel, not the fastest one timed anew for every Poisson batch size: cheaper on tiny runs."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _audit(tmp_path, capsys, name):
    code = main(["audit", "dpdm-mnist5k", *AUDIT, "--canaries", "500", "--out", str(tmp_path / name), "--quiet"])
    out, err = capsys.readouterr()
    return code, json.loads((tmp_path / name / "audit.json").read_text()), out, err


@pytest.mark.slow
def test_a_correct_dp_run_passes(tmp_path, capsys):
    code, result, out, _ = _audit(tmp_path, capsys, "correct")
    assert code == 0 and result["passed"] and "passed" in out
    assert result["claimed_epsilon"] == pytest.approx(1.0, rel=1e-2) and result["steps"] == 8
    assert result["epsilon_lower_bound"] < result["claimed_epsilon"]
    assert result["canaries"] == 500 and 200 < result["included"] < 300 and "gradient canaries" in result["attack"]


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["no_noise", "no_clipping"])
def test_a_silently_broken_mechanism_fails_the_audit(tmp_path, capsys, monkeypatch, bug):
    """The ledger still claims epsilon 1 while the noise (or the clipping) is gone: the audit must say so."""
    import torch
    from opacus.optimizers import optimizer, optimizer_fast_gradient_clipping

    from privdiff.privacy.bookkeeping import BookKeeping

    if bug == "no_noise":  # the optimizer's noise draw returns zeros
        silent = lambda std, reference, generator=None, secure_mode=False: torch.zeros_like(reference)  # noqa: E731
        monkeypatch.setattr(optimizer, "_generate_noise", silent)
        monkeypatch.setattr(optimizer_fast_gradient_clipping, "_generate_noise", silent)
    else:  # per-example clipping to an infinite norm
        clipped_backward = BookKeeping.clipped_backward

        def unclipped(self, loss):
            self.C = math.inf
            return clipped_backward(self, loss)
        monkeypatch.setattr(BookKeeping, "clipped_backward", unclipped)
    code, result, _, err = _audit(tmp_path, capsys, bug)
    assert result["claimed_epsilon"] == pytest.approx(1.0, rel=1e-2)  # the ledger did not notice
    assert code == 1 and not result["passed"] and "AUDIT FAILED" in err
    assert result["epsilon_lower_bound"] > result["claimed_epsilon"]
