"""LoRA adapters (peft) on the pixel UNet, PrivateLoRA's privacy term, and the method end to end."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from privdiff.config import resolve_recipe
from privdiff.diffusion import Denoiser
from privdiff.methods.lora import PrivacyTerm
from privdiff.models import UNetNet, build_unet
from privdiff.models.lora import LoRASpec, LoRAUNetNet, lora_parameters
from tests.helpers import TINY
from tests.helpers import toy_dataset

ROOT = Path(__file__).resolve().parents[2]


def _recipe(*extra):
    return resolve_recipe(ROOT / "recipes/lora-mnist5k-stable.yaml", [*TINY, *extra])


def _lora_net(recipe, seed=0):
    torch.manual_seed(seed)
    base = UNetNet(build_unet(recipe.model, resolution=8, in_channels=1, num_classes=10))
    net = LoRAUNetNet.from_base(base, LoRASpec(rank=4, alpha=2.0))
    return base, net


def test_only_adapters_train_and_the_start_is_the_base_model():
    r = _recipe()
    base, net = _lora_net(r)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    x, c, lab = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    torch.testing.assert_close(net(x, c, lab), base(x, c, lab))  # B = 0: W' = W


def test_checkpoint_is_the_merged_unet_and_resumes_the_adapters(tmp_path):
    r = _recipe()
    _, net = _lora_net(r)
    with torch.no_grad():
        for p in lora_parameters(net):
            p.normal_(0, 0.1)  # adapters that change the output
    net.eval()
    net.save_pretrained(tmp_path / "unet")
    x, c, lab = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    merged = UNetNet(UNet2DModel.from_pretrained(tmp_path / "unet", local_files_only=True)).eval()
    torch.testing.assert_close(merged(x, c, lab), net(x, c, lab), atol=1e-5, rtol=1e-4)
    back = LoRAUNetNet.from_pretrained(tmp_path / "unet").eval()
    torch.testing.assert_close(back(x, c, lab), net(x, c, lab))
    for a, b in zip(lora_parameters(back), lora_parameters(net)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("feature", ["map", "loss"])
@pytest.mark.parametrize("objective", ["privatelora", "stable"])
def test_privacy_term_has_a_lora_gradient_that_depends_on_lambda(objective, feature):
    """The pitfall (reference note §7.1): G must be differentiable through the NON-detached error maps."""
    grads = {}
    for lam in (0.05, 1.0):
        r = _recipe(f"lora.objective={objective}", f"lora.lam={lam}", f"lora.attacker_feature={feature}")
        _, net = _lora_net(r)
        with torch.no_grad():
            for n, p in net.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.05)  # past the zero start, so A gets gradient too
        den = Denoiser(net)
        members, m_aux, nm_aux = toy_dataset(8, 1), toy_dataset(4, 2), toy_dataset(4, 3)
        term = PrivacyTerm(r, members=members, member_aux=m_aux, nonmember_aux=nm_aux, device=torch.device("cpu"))
        idx = torch.arange(8)
        ce = term.ce_member(den, idx)
        assert ce.shape == (8,) and ce.requires_grad
        # the privacy part alone: objective minus what it is at λ = 0 (a constant ℓ_ada)
        loss = torch.full((8,), 0.7)
        term.g.manual_seed(0)
        total = term.objective(den, idx, loss).sum()
        params = lora_parameters(net)
        g = torch.autograd.grad(total, params)
        flat = torch.cat([x.flatten() for x in g])
        assert flat.abs().sum() > 0, "privacy term has no gradient w.r.t. the LoRA weights"
        assert all(
            x.abs().sum() > 0
            for x, (n, _) in zip(g, [(n, p) for n, p in net.named_parameters() if p in set(params)])
            if ".lora_A." in n
        )
        grads[lam] = flat
    assert not torch.allclose(grads[0.05], grads[1.0])


def test_attacker_step_trains_only_the_attacker():
    r = _recipe("lora.objective=stable")
    _, net = _lora_net(r)
    den = Denoiser(net)
    term = PrivacyTerm(
        r,
        members=toy_dataset(8, 1),
        member_aux=toy_dataset(4, 2),
        nonmember_aux=toy_dataset(4, 3),
        device=torch.device("cpu"),
    )
    before_h = [p.clone() for p in term.attacker.parameters()]
    before_lora = [p.clone() for p in lora_parameters(net)]
    term.objective(den, torch.arange(4), torch.ones(4)).sum().backward()  # leaves grads on ω too
    term.after_step(0)
    assert any(not torch.equal(a, b) for a, b in zip(before_h, term.attacker.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_lora, lora_parameters(net)))
    assert all(p.grad is None for p in term.attacker.parameters())


@pytest.mark.slow
def test_lora_method_end_to_end(tmp_path, capsys, monkeypatch):
    from privdiff.cli import main

    out = tmp_path / "run"
    args = [
        "train",
        str(ROOT / "recipes/lora-mnist5k-stable.yaml"),
        *TINY,
        "lora.n_per_role=16",
        "lora.public_margin=1",
        "lora.pretrain.max_steps=2",
        "lora.pretrain.batch_size=32",
        "train.batch_size=8",
        "train.max_steps=3",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0, capsys.readouterr().err
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["epsilon"] is None and ledger["events"][0]["stage"] == "lora" and ledger["events"][0]["steps"] == 3
    assert ledger["dataset"]["size"] == 32 and ledger["public_stages"][0]["data"]["name"] == "digits"
    splits = json.loads((out / "splits.json").read_text())
    assert splits["trained_on"] == "member_aux+member_test"
    assert (out / "attacker_log.jsonl").is_file()
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    UNet2DModel.from_pretrained(ckpt / "unet_ema", local_files_only=True)  # merged: plain diffusers
    # resume to more steps continues the ledger
    assert main([*args[:-3], "train.max_steps=4", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "ledger.json").read_text())["events"][0]["steps"] == 4
    assert main(["attack", str(out), "--attack", "loss", "--quiet"]) == 0
    r = json.loads((out / "attacks" / "loss.json").read_text())
    assert r["n_members"] == r["n_nonmembers"] == 16
    # evaluate judges the run against what it trained on (and what its ledger names): the 32 members
    monkeypatch.setenv("PRIVDIFF_CACHE", str(tmp_path / "cache"))
    assert (
        main(
            [
                "evaluate",
                str(out),
                "evaluate.classifier_epochs=1",
                "evaluate.kid_subset_size=10",
                "evaluate.kid_subsets=5",
                "--n",
                "30",
                "--quiet",
                "--no-report",
            ]
        )
        == 0
    ), capsys.readouterr().err
    data = json.loads((out / "metrics.json").read_text())["data"]
    assert data["n_train"] == 32 and data["fingerprint"] == ledger["dataset"]["fingerprint"]


# -- DP-SGD LoRA (recipes/lora-mnist5k-dp.yaml) ----------------------------------------------------

DP_TINY = [
    *TINY,
    "lora.n_per_role=16",
    "lora.public_margin=1",
    "lora.pretrain.max_steps=2",
    "lora.pretrain.batch_size=32",
    "train.batch_size=8",
    "train.max_steps=3",
    "privacy.noise_multiplicity=1",
]


def test_dp_lora_ledger_is_the_accountants_epsilon_of_what_ran_with_pretraining_public(tmp_path):
    from privdiff.methods.lora import STAGE, train
    from privdiff.privacy.accounting import calibrate_noise, epsilon
    from privdiff.privacy.registry import Registry, charge
    from privdiff.runs import Run

    r = resolve_recipe(ROOT / "recipes/lora-mnist5k-dp.yaml", DP_TINY)
    assert r.privacy.enabled and r.lora.objective == "lora"
    out = tmp_path / "run"
    train(r, out=out, progress=False, grid_per_class=1)
    ledger = json.loads((out / "ledger.json").read_text())
    members = 2 * r.lora.n_per_role
    assert ledger["private"] and ledger["dataset"]["size"] == members and ledger["target_epsilon"] == 10.0
    [event] = ledger["events"]
    sigma = calibrate_noise(
        epsilon_target=10.0,
        delta=r.privacy.delta,
        sample_rate=8 / members,
        steps=round(r.train.epochs * members / 8),
        accountant="rdp",
    )
    assert event == {
        "stage": STAGE,
        "mechanism": "subsampled_gaussian",
        "noise_multiplier": pytest.approx(sigma),
        "sample_rate": 8 / members,
        "max_grad_norm": 1.0,
        "sensitivity": None,
        "steps": 3,
    }
    eps = epsilon([(event["noise_multiplier"], event["sample_rate"], 3)], delta=r.privacy.delta, accountant="rdp")
    assert ledger["epsilon"] == pytest.approx(eps, rel=1e-12) and 0 < eps < 10  # 3 of the calibrated steps ran
    log = [e for e in Run(out).read_train_log() if e["stage"] == STAGE]
    assert [e["step"] for e in log] == [1, 2, 3] and log[-1]["epsilon"] == pytest.approx(eps, rel=1e-12)
    assert [(s["stage"], s["data"]["name"], s["steps"]) for s in ledger["public_stages"]] == [("pretrain", "digits", 2)]
    # the budget registry reserved the stage the ledger records (train.max_steps=3 of it), so it is charged what ran
    [status] = Registry().status()
    [entry] = status.runs
    assert entry.complete and charge(entry.planned, entry.events) == entry.events
    assert status.committed == pytest.approx(eps, rel=1e-12)


@pytest.mark.parametrize("objective", ["privatelora", "stable"])
def test_dp_sgd_refuses_the_defenses_whose_attacker_reads_members_outside_the_accountant(objective):
    from privdiff.config import RecipeError

    with pytest.raises(RecipeError, match="without DP: set privacy.enabled=false"):
        resolve_recipe(ROOT / "recipes/lora-mnist5k-dp.yaml", [f"lora.objective={objective}"])


def test_an_unknown_attacker_feature_is_refused_by_name():
    from privdiff.config import RecipeError

    with pytest.raises(RecipeError, match="lora.attacker_feature must be one of map, loss"):
        _recipe("lora.attacker_feature=pixels")


def test_book_keeping_clips_the_lora_gradients_as_one_example_at_a_time():
    """DP-SGD's per-example norms and clipped sum over the LoRA A, B of a UNet (base frozen) equal the slow reference."""
    from privdiff.diffusion import LogNormalSigma, denoising_loss, draw_training_noise
    from tests.helpers import assert_same

    r = _recipe()
    _, net = _lora_net(r, seed=3)
    with torch.no_grad():
        for p in lora_parameters(net):
            p.normal_(0, 0.1)  # B ≠ 0, so A has a gradient too
    den = Denoiser(net)
    B, K, g = 4, 2, torch.Generator().manual_seed(5)
    x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    sigma, noise = draw_training_noise(x0, K=K, sigma_dist=LogNormalSigma(), generator=g)
    y = torch.randint(0, 11, (B, K), generator=g)

    def batch_loss(m):
        return denoising_loss(m, x0, y, sigma=sigma, noise=noise, loss_weight=den.loss_weight)

    def row_loss(m, b):
        return denoising_loss(
            m, x0[b : b + 1], y[b : b + 1], sigma=sigma[b : b + 1], noise=noise[b : b + 1], loss_weight=den.loss_weight
        )

    norms = assert_same(den, batch_loss, row_loss, B, K, 1e-2)
    assert float(norms.min()) > 1e-2  # clipping active for every example


# -- resuming PrivateLoRA: the proxy attacker is part of the checkpoint ----------------------------


def _defended_run(out, r, *, max_steps: int) -> tuple[PrivacyTerm, list[torch.Tensor]]:
    """train_denoiser on the LoRA stage with a fresh PrivacyTerm (as a new process builds it) up to ``max_steps``."""
    from dataclasses import replace

    from privdiff.core.training import Stage, train_denoiser
    from privdiff.runs import Run

    r = replace(r, train=replace(r.train, max_steps=max_steps))
    members = toy_dataset(8, 1)
    term = PrivacyTerm(
        r,
        members=members,
        member_aux=toy_dataset(4, 2),
        nonmember_aux=toy_dataset(4, 3),
        device=torch.device("cpu"),
        log=out / "attacker_log.jsonl",
    )
    out.mkdir(exist_ok=True)
    run = Run(out)

    def init():
        return _lora_net(r, seed=7)[1]

    result = train_denoiser(
        run=run, recipe=r, dataset=members, ledger=None, stage=Stage(name="lora", init=init), term=term, progress=False
    )
    assert result.steps == max_steps
    return term, [p.detach().clone() for p in lora_parameters(run.load_checkpoint().unet)]


@pytest.mark.parametrize("objective", ["privatelora", "stable"])
def test_a_resumed_defended_run_takes_the_steps_of_an_uninterrupted_one(tmp_path, objective):
    r = _recipe(
        f"lora.objective={objective}",
        "lora.lam=1.0",
        "train.batch_size=4",
        "train.epochs=3",
        "train.checkpoint_every=100",
        "lora.attacker_batch=2",
        "model.attention_levels=[]",
    )
    whole, lora_whole = _defended_run(tmp_path / "whole", r, max_steps=5)
    _, lora_first = _defended_run(tmp_path / "split", r, max_steps=2)  # stops at step 2 and checkpoints it
    with open(tmp_path / "split/attacker_log.jsonl", "a") as f:
        f.write(
            '{"step": 3, "attacker_ce": 0.5, "attacker_acc": 0.5}\n'
        )  # as an attempt killed after its checkpoint logs
    resumed, lora_resumed = _defended_run(tmp_path / "split", r, max_steps=5)
    assert not all(torch.equal(a, b) for a, b in zip(lora_first, lora_whole))  # steps 3..5 changed the adapters
    for a, b in zip(lora_resumed, lora_whole):
        assert torch.equal(a, b)
    for a, b in zip(resumed.attacker.state_dict().values(), whole.attacker.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(resumed.g.get_state(), whole.g.get_state())
    # the attacker log is the uninterrupted run's (lines written after the checkpoint are dropped, not duplicated)
    assert (tmp_path / "split/attacker_log.jsonl").read_text() == (tmp_path / "whole/attacker_log.jsonl").read_text()


def test_resuming_a_defended_run_without_saved_attacker_state_is_refused(tmp_path):
    from dataclasses import replace

    from privdiff.core.training import Stage, train_denoiser
    from privdiff.runs import Run, RunError

    r = _recipe(
        "lora.objective=stable",
        "train.batch_size=4",
        "train.epochs=3",
        "train.max_steps=1",
        "model.attention_levels=[]",
    )
    members = toy_dataset(8, 1)
    run = Run(tmp_path)
    train_denoiser(
        run=run,
        recipe=r,
        dataset=members,
        ledger=None,
        stage=Stage(name="lora", init=lambda: _lora_net(r)[1]),
        progress=False,
    )
    term = PrivacyTerm(
        r, members=members, member_aux=toy_dataset(4, 2), nonmember_aux=toy_dataset(4, 3), device=torch.device("cpu")
    )
    with pytest.raises(RunError, match="holds no state for stage lora's PrivacyTerm"):
        train_denoiser(
            run=run,
            recipe=replace(r, train=replace(r.train, max_steps=2)),
            dataset=members,
            ledger=None,
            stage=Stage(name="lora", init=lambda: _lora_net(r)[1]),
            term=term,
            progress=False,
        )
