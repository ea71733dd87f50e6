"""The one-run privacy audit: its bound against hand computation, and on real tiny DP-SGD runs."""

import json
import math

import pytest

from privdiff.cli import main
from privdiff.privacy.audit import epsilon_lower_bound


def test_bound_all_guesses_right_is_the_hand_computed_binomial_case():
    # r = 10 guesses, all right: P[Bin(10, p) >= 10] = p^10 = 0.05  =>  p = 0.05^(1/10), eps = log(p / (1 - p))
    p = 0.05**0.1
    assert epsilon_lower_bound(correct=10, guesses=10, canaries=10) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_bound_nine_of_ten_against_the_binomial_polynomial():
    # P[Bin(10, p) >= 9] = 10 p^9 (1 - p) + p^10: solve = 0.05 - m*delta by bisection on p, by hand
    m, delta = 100, 1e-4
    lo, hi = 0.5, 1.0
    for _ in range(100):
        p = (lo + hi) / 2
        lo, hi = (lo, p) if 10 * p**9 * (1 - p) + p**10 > 0.05 - m * delta else (p, hi)
    assert epsilon_lower_bound(correct=9, guesses=10, canaries=m, delta=delta) == pytest.approx(
        math.log(lo / (1 - lo)), abs=1e-5
    )


def test_bound_is_zero_when_chance_explains_the_guesses():
    assert epsilon_lower_bound(correct=58, guesses=100, canaries=100) == 0.0  # P[Bin(100, 1/2) >= 58] = 0.067 > 0.05
    assert epsilon_lower_bound(correct=60, guesses=100, canaries=100) > 0.0  # ... >= 60: 0.028
    assert epsilon_lower_bound(correct=70, guesses=100, canaries=100) > 0.0
    with pytest.raises(ValueError, match="m\\*delta"):
        epsilon_lower_bound(correct=10, guesses=10, canaries=10_000, delta=1e-5)


# a 4x4 one-level DPDM on sklearn's digits: q = 512/1437, 8 steps, claimed epsilon 1 (calibrated for those 8 steps);
# 500 canaries: a perfect attack reaches a bound of about 3.1, a correct run about 0.3
AUDIT = [
    "data.name=digits",
    "data.resolution=4",
    "model.channels=[4]",
    "model.attention_levels=[]",
    "model.norm_num_groups=2",
    "model.attention_head_dim=4",
    "train.batch_size=512",
    "train.epochs=2.85",
    "privacy.noise_multiplicity=1",
    "train.max_physical_batch_size=1024",
    "privacy.epsilon=1",
]


pytestmark = pytest.mark.usefixtures("deterministic_kernels")


def _audit(tmp_path, capsys, name, recipe="dpdm-mnist5k", overrides=AUDIT, canaries=500):
    code = main(["audit", recipe, *overrides, "--canaries", str(canaries), "--out", str(tmp_path / name), "--quiet"])
    out, err = capsys.readouterr()
    return code, json.loads((tmp_path / name / "audit.json").read_text()), out, err


def _break(monkeypatch, bug: str) -> None:
    """Silently remove the optimizer's noise (``no_noise``) or the per-example clipping (``no_clipping``)."""
    import torch
    from opacus.optimizers import optimizer, optimizer_fast_gradient_clipping

    from privdiff.privacy.clipping import BookKeeping

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
    _break(monkeypatch, bug)
    code, result, _, err = _audit(tmp_path, capsys, bug)
    assert result["claimed_epsilon"] == pytest.approx(1.0, rel=1e-2)  # the ledger did not notice
    assert code == 1 and not result["passed"] and "AUDIT FAILED" in err
    assert result["epsilon_lower_bound"] > result["claimed_epsilon"]


# The multi-stage methods on sklearn's digits (1,437 training images, 4x4, q = 512/1437 as above): DP-LDM with
# mnist5k as its public data (autoencoder, pretraining), DPP with a 2-round release before DP-SGD.
TINY_STAGES = [
    "data.name=digits",
    "data.resolution=4",
    "train.batch_size=512",
    "train.epochs=2.85",
    "train.max_steps=4",
    "privacy.noise_multiplicity=1",
    "train.max_physical_batch_size=1024",
    "privacy.epsilon=1",
    "sampler.steps=2",
]
MULTI_STAGE = {
    "dp-ldm-mnist5k": TINY_STAGES
    + [
        "ldm.public_data=mnist5k",
        "ldm.public_margin=0",
        "ldm.autoencoder.channels=[4]",
        "ldm.autoencoder.norm_num_groups=2",
        "ldm.autoencoder.epochs=0.02",
        "ldm.unet.channels=[8]",
        "ldm.unet.attention_heads=2",
        "ldm.unet.norm_num_groups=4",
        "ldm.text.width=8",
        "ldm.text.layers=1",
        "ldm.text.heads=2",
        "ldm.pretrain.batch_size=32",
        "ldm.pretrain.max_steps=2",
    ],
    "dpp-mnist5k": TINY_STAGES
    + [
        "model.channels=[4]",
        "model.attention_levels=[]",
        "model.norm_num_groups=2",
        "model.attention_head_dim=4",
        "dpp.rounds=2",
        "dpp.batch_size=500",
        "dpp.downsample=1",
        "dpp.copies=2",
        "dpp.pretrain.max_steps=2",
        "dpp.pretrain.batch_size=32",
    ],
}


def _stage_epsilon(run, stage="dp_sgd"):
    """The accountant on the stage's ledger events alone (recomputed here from the file)."""
    from privdiff.privacy.accounting import epsilon

    ledger = json.loads((run / "ledger.json").read_text())
    return epsilon(
        [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["events"] if e["stage"] == stage],
        delta=ledger["delta"],
        accountant=ledger["accountant"],
    ), ledger


@pytest.mark.parametrize("recipe", list(MULTI_STAGE))
def test_a_multi_stage_recipe_is_audited_against_its_dp_sgd_stage(tmp_path, capsys, recipe):
    code, result, out, err = _audit(tmp_path, capsys, recipe, recipe, MULTI_STAGE[recipe], canaries=200)
    assert code == 0 and result["passed"], err
    stage_eps, ledger = _stage_epsilon(tmp_path / recipe)
    assert result["stage"] == "dp_sgd" and result["stage_epsilon"] == pytest.approx(stage_eps, rel=1e-9)
    assert result["claimed_epsilon"] == pytest.approx(ledger["epsilon"], rel=1e-9) and result["steps"] == 4
    assert result["epsilon_lower_bound"] < result["stage_epsilon"] <= result["claimed_epsilon"] <= 1.0 + 1e-6
    if recipe.startswith("dpp"):  # the release before DP-SGD is part of the claim, not of what the canaries see
        assert [e["stage"] for e in ledger["events"]] == ["central_images", "dp_sgd"]
        assert result["stage_epsilon"] < result["claimed_epsilon"]
    else:  # DP-LDM's earlier stages are public
        assert [e["stage"] for e in ledger["events"]] == ["dp_sgd"] and ledger["public_stages"]
    assert f"{result['stage_epsilon']:.4f}" in out and f"{result['claimed_epsilon']:.4f}" in out


@pytest.mark.parametrize("recipe", list(MULTI_STAGE))
def test_a_multi_stage_recipe_without_noise_in_its_dp_sgd_stage_fails(tmp_path, capsys, monkeypatch, recipe):
    """The canaries are in the DP-SGD stage that is broken: its bound passes the stage's epsilon."""
    _break(monkeypatch, "no_noise")
    code, result, _, err = _audit(tmp_path, capsys, recipe, recipe, MULTI_STAGE[recipe], canaries=200)
    assert code == 1 and not result["passed"] and "AUDIT FAILED" in err
    assert result["epsilon_lower_bound"] > result["stage_epsilon"]


def test_audit_refuses_a_recipe_it_cannot_audit(tmp_path, capsys):
    assert main(["audit", "lora-mnist5k", "--out", str(tmp_path / "lora"), "--quiet"]) == 2
    assert "one DP-SGD stage" in capsys.readouterr().err
