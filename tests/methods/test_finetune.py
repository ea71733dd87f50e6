"""method dp-finetune: a user's pretrained diffusers UNet2DModel, DP-SGD fine-tuned on their image folder,
through the command line; tiny random models built from configs (as diffusers' own tests build dummies)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from privdiff.cli import main
from privdiff.core.denoisers import load_denoiser
from privdiff.diffusion.discrete import DiscreteSchedule, VPDenoiser
from privdiff.privacy.accounting import epsilon
from privdiff.runs import Run
from tests.helpers import image_folder, tiny_pixel_unet

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.resolution=8",
    "data.holdout=0.2",
    "train.batch_size=8",
    "train.epochs=2",
    "train.max_steps=3",
    "train.max_physical_batch_size=64",
    "privacy.noise_multiplicity=2",
    "sampler.steps=3",
    "train.lr=0.001",
]


def _unet_dir(path: Path, *, classes: int | None, prediction_type: str, seed: int) -> Path:
    """A saved pixel UNet2DModel directory with its scheduler config beside it (the DDPM layout)."""
    tiny_pixel_unet(seed, classes=classes).save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type).save_config(path)
    return path


@pytest.mark.parametrize(
    "prediction_type, classes, trainable", [("epsilon", None, "[attentions]"), ("v_prediction", 3, "[all]")]
)
def test_a_users_unet_is_dp_fine_tuned_and_keeps_its_objective(
    tmp_path, monkeypatch, prediction_type, classes, trainable
):
    seed = int(np.random.default_rng().integers(0, 10_000))
    unet_dir = _unet_dir(tmp_path / "unet", classes=classes, prediction_type=prediction_type, seed=seed)
    image_folder(tmp_path / "images", np.random.default_rng(seed), classes={"a": 12, "b": 12, "c": 12})
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    run = tmp_path / "run"
    code = main(
        [
            "train",
            str(ROOT / "recipes/pretrained-unet-dp.yaml"),
            *TINY,
            "model.pretrained=unet",
            "data.root=images",
            f"model.trainable={trainable}",
            "--out",
            str(run),
            "--quiet",
        ]
    )
    assert code == 0
    ledger = json.loads((run / "ledger.json").read_text())
    (event,) = ledger["events"]
    assert event["stage"] == "dp_sgd" and event["steps"] == 3 and event["noise_multiplier"] > 0
    assert ledger["epsilon"] == pytest.approx(
        epsilon([(event["noise_multiplier"], event["sample_rate"], 3)], delta=1e-5)
    )
    assert [p["stage"] for p in ledger["public_stages"]] == [
        "pretrained"
    ]  # the user's weights, named as the public prior
    # the net kept its own objective, and what was frozen stayed bitwise equal
    den = load_denoiser(Run(run))
    assert isinstance(den, VPDenoiser) and den.schedule == DiscreteSchedule(prediction_type=prediction_type)
    before = UNet2DModel.from_pretrained(unet_dir).state_dict()
    after = Run(run).load_net(ema=False).unet.state_dict()
    frozen = [k for k in before if "attentions" not in k] if trainable == "[attentions]" else []
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen) or trainable == "[all]"
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in frozen)
    # sample from another directory: the run's config holds the absolute model path
    monkeypatch.chdir(ROOT)
    assert (
        main(
            ["sample", str(run), "--n", "3", "--out", str(tmp_path / "s.npz"), "--quiet"]
            + (["--label", "1"] if classes else [])
        )
        == 0
    )
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (3, 1, 8, 8) and np.isfinite(f["images"]).all()
    if classes is None:  # an unconditional model evaluates on image metrics alone (no class: no downstream accuracy)
        assert main(["evaluate", str(run), "--n", "20", "evaluate.feature_epochs=1", "--no-report", "--quiet"]) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert {"fid", "kid", "precision", "recall"} == set(metrics["metrics"]) and metrics["samples"][
            "labels"
        ].startswith("none")
        assert np.isfinite(metrics["metrics"]["fid"]["value"])
        assert main(["attack", str(run), "--attack", "loss", "--quiet"]) == 0  # in the net's own discrete time
        assert json.loads((run / "attacks" / "loss.json").read_text())["n_members"] > 0
    # export: a plain diffusers UNet directory (with its scheduler) that diffusers loads
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    back = UNet2DModel.from_pretrained(out)
    for k, v in Run(run).load_net(ema=True).unet.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert DDPMScheduler.from_pretrained(out).config.prediction_type == prediction_type


def test_a_unet_that_does_not_fit_the_data_is_refused_before_anything_is_written(tmp_path, capsys):
    unet_dir = _unet_dir(tmp_path / "unet", classes=None, prediction_type="epsilon", seed=0)
    data = image_folder(tmp_path / "images", np.random.default_rng(), classes={"a": 8, "b": 8})
    run = tmp_path / "run"
    args = [
        "train",
        str(ROOT / "recipes/pretrained-unet-dp.yaml"),
        *TINY,
        f"model.pretrained={unet_dir}",
        f"data.root={data}",
    ]
    assert main([*args, "data.resolution=16", "--out", str(run), "--quiet"]) == 2
    assert "takes 1-channel 8x8 images" in capsys.readouterr().err and not run.exists()
    assert main([*args, "model.trainable=[no_such_block]", "--out", str(run), "--quiet"]) == 2
    assert "no_such_block" in capsys.readouterr().err and not run.exists()
    assert main([*args, f"model.pretrained={tmp_path / 'images'}", "--out", str(run), "--quiet"]) == 2
    assert "neither a diffusers UNet directory" in capsys.readouterr().err and not run.exists()
