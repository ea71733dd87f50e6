"""method lora on a Stable-Diffusion-style pipeline (recipes/sd-lora*.yaml): LoRA, PrivateLoRA, Stable PrivateLoRA
and DP-SGD LoRA on a tiny random pipeline and a captioned folder written here, through the command line; every
attack scores the runs with each example's own caption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.cli import main
from privdiff.privacy.accounting import epsilon
from privdiff.core.training import STATE_KEY
from privdiff.privacy.registry import Registry
from privdiff.runs import Run
from tests.helpers import tiny_sd_pipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "train.batch_size=2",
    "train.epochs=1",
    "train.max_steps=2",
    "train.checkpoint_every=1",
    "sampler.steps=2",
    "lora.rank=2",
    "lora.n_per_role=3",
    "lora.attacker_batch=2",
    "train.lr=0.01",
    "lora.lam=1.0",
]


def _captioned(root: Path, rng: np.random.Generator, n: int) -> Path:
    root.mkdir(parents=True)
    words = ["red", "blue", "cat", "dog", "tree", "car"]
    lines = []
    for i in range(n):
        from PIL import Image

        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": " ".join(rng.choice(words, size=2))}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    rng = np.random.default_rng()
    root = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(root / "base", seed=int(rng.integers(0, 10_000)))
    return root / "base", _captioned(root / "images", rng, 14)


def _lora_state(run: Path) -> dict:
    net = Run(run).load_net(ema=False)
    return {n: p.detach().clone() for n, p in net.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("recipe", ["sd-lora-privatelora", "sd-lora-stable"])
def test_privatelora_on_a_pipeline_resumes_as_if_uninterrupted(tmp_path, pipeline, recipe):
    base, images = pipeline
    args = [str(ROOT / f"recipes/{recipe}.yaml"), *TINY, f"model.pretrained={base}", f"data.root={images}"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", *args, "train.max_steps=3", "--no-grid", "--out", str(whole), "--quiet"]) == 0
    assert main(["train", *args, "--no-grid", "--out", str(cut), "--quiet"]) == 0  # 2 steps, then resumed to 3
    assert main(["train", *args, "train.max_steps=3", "--no-grid", "--out", str(cut), "--quiet"]) == 0
    a, b = _lora_state(whole), _lora_state(cut)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if ".lora_B." in k)  # the adapters moved off B = 0
    # the attacker continued where the checkpoint left it: the same h_ω in both runs' last checkpoints
    wa, wb = (Run(r).load_checkpoint().extra[STATE_KEY]["attacker"] for r in (whole, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (whole / "attacker_log.jsonl").read_text() == (cut / "attacker_log.jsonl").read_text()
    ledger = json.loads((cut / "ledger.json").read_text())
    assert ledger["events"][0]["steps"] == 3 and ledger["dataset"]["size"] == 6  # the members only trained
    # ... but the proxy attacker read nonmember_aux without DP: the ledger names it and the registry counts its
    # examples with the members' (eps = inf for all 9), so a later run on them composes with this one
    assert ledger["dataset"]["also_touched"]["size"] == 3
    (status,) = [s for s in Registry().status() if any(r.run_id == ledger["run_id"] for r in s.runs)]
    assert status.size == 9
    splits = json.loads((cut / "splits.json").read_text())
    seen = [i for r in splits["roles"].values() for i in r["indices"]]
    assert len(seen) == len(set(seen)) == 12  # four disjoint roles of 3


def test_plain_and_dp_lora_on_a_pipeline_export_and_every_attack_scores_them(tmp_path, pipeline):
    from diffusers import StableDiffusionPipeline

    base, images = pipeline
    common = [*TINY, f"model.pretrained={base}", f"data.root={images}"]
    plain, dp = tmp_path / "plain", tmp_path / "dp"
    assert main(["train", str(ROOT / "recipes/sd-lora.yaml"), *common, "--out", str(plain), "--quiet"]) == 0
    assert (plain / "samples" / "grid.png").is_file()  # empty-prompt samples, never a private caption
    dp_args = ["privacy.enabled=true", "privacy.epsilon=10", "privacy.noise_multiplicity=2"]
    assert (
        main(["train", str(ROOT / "recipes/sd-lora.yaml"), *common, *dp_args, "--no-grid", "--out", str(dp), "--quiet"])
        == 0
    )
    ledger = json.loads((dp / "ledger.json").read_text())
    assert ledger["dataset"]["size"] == 6 and 0 < ledger["epsilon"] <= 10  # the members only
    (event,) = ledger["events"]
    assert event["sample_rate"] == pytest.approx(2 / 6) and "also_touched" not in ledger["dataset"]
    assert ledger["epsilon"] == pytest.approx(
        epsilon([(event["noise_multiplier"], event["sample_rate"], event["steps"])], delta=1e-5)
    )
    assert [s["stage"] for s in ledger["public_stages"]] == ["pretrained"]
    # the exported adapters load into a fresh copy of the base pipeline and change it
    assert main(["export", str(plain), "--out", str(tmp_path / "exported")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    kwargs = dict(num_inference_steps=2, height=16, width=16, output_type="np", latents=torch.ones(1, 4, 8, 8))
    before = pipe("red cat", **kwargs).images
    pipe.load_lora_weights(tmp_path / "exported" / "lora")
    assert not np.allclose(before, pipe("red cat", **kwargs).images)
    # every attack, each example conditioned on its own caption, on the pipeline's own timesteps
    assert main(["attack", str(plain), "--attack", "all", "--quiet"]) == 0
    for name in ("loss", "secmi", "pia", "pian", "proxy", "proxy-loss"):
        result = json.loads((plain / "attacks" / f"{name}.json").read_text())
        assert 0 <= result["auc"] <= 1 and result["n_members"] == 3 and (plain / "attacks" / f"{name}.png").is_file()
        assert result["splits"]["model_trained_on"] == "member_aux+member_test"
    # the pool's images in no role (never trained on, never seen by a proxy) join the scored non-members
    assert main(["attack", str(plain), "--attack", "loss", "--unused-nonmembers", "2", "--quiet"]) == 0
    result = json.loads((plain / "attacks" / "loss.json").read_text())
    assert result["n_nonmembers"] == 5 and result["splits"]["scored"] == ["member_test", "nonmember_test+unused"]
