"""method dp-finetune on a Stable-Diffusion-style pipeline (recipes/sd-dp-ldm.yaml): a tiny random pipeline
built from configs and a captioned folder written here, through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privdiff.cli import main
from privdiff.privacy.accounting import epsilon
from privdiff.runs import Run
from tests.helpers import tiny_sd_pipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "train.batch_size=4",
    "train.epochs=2",
    "train.max_steps=2",
    "train.max_physical_batch_size=16",
    "privacy.noise_multiplicity=2",
    "sampler.steps=2",
    "train.lr=0.001",
]
WORDS = ["red", "blue", "cat", "dog", "tree", "car"]


def _captioned(root: Path, rng: np.random.Generator, n: int) -> Path:
    """A diffusers-style captioned folder: random 16x16 RGB PNGs and metadata.jsonl (file_name, text)."""
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": " ".join(rng.choice(WORDS, size=2))}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("layout,prediction_type", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_a_users_sd_pipeline_is_dp_fine_tuned_on_captioned_images_and_exported(tmp_path, layout, prediction_type):
    from diffusers import StableDiffusionPipeline

    seed = int(np.random.default_rng().integers(0, 10_000))
    base = tmp_path / "base"
    tiny_sd_pipeline(base, prediction_type=prediction_type, seed=seed, layout=layout)
    data = _captioned(tmp_path / "images", np.random.default_rng(seed), 24)
    run = tmp_path / "run"
    args = [
        "train",
        str(ROOT / "recipes/sd-dp-ldm.yaml"),
        *TINY,
        f"model.pretrained={base}",
        f"data.root={data}",
        "data.holdout=0.25",
    ]
    assert main([*args, "--out", str(run), "--quiet"]) == 0
    ledger = json.loads((run / "ledger.json").read_text())
    (event,) = ledger["events"]
    assert event["steps"] == 2 and ledger["dataset"]["size"] == 18  # 6 of 24 held out, never trained on
    assert ledger["dataset"]["holdout"] == 0.25
    assert ledger["epsilon"] == pytest.approx(
        epsilon([(event["noise_multiplier"], event["sample_rate"], 2)], delta=1e-5)
    )
    # only the UNet's attention blocks moved; the rest of the UNet is bitwise the pipeline's
    before = StableDiffusionPipeline.from_pretrained(base, local_files_only=True).unet.state_dict()
    after = Run(run).load_net(ema=False).unet.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("attentions" in k for k in moved)
    # a prompt at sampling time (the frozen text encoder reads it), decoded by the pipeline's VAE
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--prompt", "red cat", "--n", "2", "--out", str(out), "--quiet"]) == 0
    with np.load(out) as f:
        assert f["images"].shape == (2, 3, 16, 16) and np.isfinite(f["images"]).all()
        default = f["images"]
    # the recipe samples with the pipeline's own scheduler; another of diffusers', or privdiff's EDM sampler, on request
    for how in (["--scheduler", "dpm-solver"], ["--sampler", "heun"]):
        other = tmp_path / f"{how[1]}.npz"
        assert main(["sample", str(run), "--prompt", "red cat", "--n", "2", *how, "--out", str(other), "--quiet"]) == 0
        with np.load(other) as f:
            assert np.isfinite(f["images"]).all() and not np.array_equal(f["images"], default)
    if prediction_type == "epsilon":  # evaluate: empty-prompt samples against the held-out captioned images
        assert (
            main(
                [
                    "evaluate",
                    str(run),
                    "--n",
                    "20",
                    "evaluate.feature_epochs=1",
                    "evaluate.feature_patches=200",
                    "--no-report",
                    "--quiet",
                ]
            )
            == 0
        )
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(metrics["metrics"]) == {"fid", "kid", "precision", "recall"} and metrics["data"]["n_test"] == 6
        # members: the trained part, non-members: the held-out part; each scored with its own caption
        assert main(["attack", str(run), "--attack", "pia", "--quiet"]) == 0
        result = json.loads((run / "attacks" / "pia.json").read_text())
        assert result["n_members"] == result["n_nonmembers"] == 3 and 0 <= result["auc"] <= 1
    # export: a pipeline diffusers loads and runs, with the fine-tuned UNet
    exported = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    ema = Run(run).load_net(ema=True).unet.state_dict()
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in ema.items())
    image = pipe("blue dog", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_dp_sgd_lora_on_a_pipeline_trains_only_the_adapters_resumes_and_exports_both_ways(tmp_path):
    from diffusers import StableDiffusionPipeline

    seed = int(np.random.default_rng().integers(0, 10_000))
    base = tmp_path / "base"
    tiny_sd_pipeline(base, seed=seed)
    data = _captioned(tmp_path / "images", np.random.default_rng(seed), 12)
    run = tmp_path / "run"
    args = [
        "train",
        str(ROOT / "recipes/sd-dp-lora.yaml"),
        *TINY,
        f"model.pretrained={base}",
        f"data.root={data}",
        "model.lora_rank=2",
    ]
    assert main([*args, "--out", str(run), "--quiet"]) == 0
    assert (
        main(
            [
                *[a for a in args if not a.startswith("train.max_steps")],
                "train.max_steps=3",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )  # resumed: the adapters come back from the checkpoint
    ledger = json.loads((run / "ledger.json").read_text())
    assert [e["steps"] for e in ledger["events"]] == [3]
    net = Run(run).load_net(ema=False)
    trained = {n for n, p in net.named_parameters() if ".lora_" in n}
    assert trained and net.lora == {"rank": 2, "alpha": 4.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}
    assert any(p.abs().sum() > 0 for n, p in net.named_parameters() if ".lora_B." in n)  # B moved off its zero init
    checkpoint = Run(run).latest_checkpoint() / "unet"
    assert not list(checkpoint.glob("diffusion_pytorch_model*"))  # the frozen base is not copied into checkpoints
    exported = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    merged = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    fresh = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    prompt = dict(num_inference_steps=2, height=16, width=16, output_type="np", generator=None)
    before = fresh("red cat", **prompt, latents=torch.ones(1, 4, 8, 8)).images
    fresh.load_lora_weights(exported / "lora")
    with_lora = fresh("red cat", **prompt, latents=torch.ones(1, 4, 8, 8)).images
    assert not np.allclose(before, with_lora)  # the adapters change the base pipeline's output
    np.testing.assert_allclose(merged("red cat", **prompt, latents=torch.ones(1, 4, 8, 8)).images, with_lora, atol=1e-4)


def test_bad_captioned_inputs_are_one_line_errors_and_nothing_is_written(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_sd_pipeline(base)
    data = _captioned(tmp_path / "images", np.random.default_rng(), 6)
    run = tmp_path / "run"
    args = ["train", str(ROOT / "recipes/sd-dp-ldm.yaml"), *TINY, f"model.pretrained={base}"]
    capsys.readouterr()  # what building the pipeline printed
    (data / "metadata.jsonl").write_text(
        (data / "metadata.jsonl").read_text() + '{"file_name": "gone.png", "text": "x"}\n'
    )
    assert main([*args, f"data.root={data}", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone.png" in err[0] and not run.exists()
    from transformers import AutoTokenizer

    (data / "metadata.jsonl").write_text("\n".join((data / "metadata.jsonl").read_text().splitlines()[:-1]) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
    tokenizer.add_tokens([f"extra{i}" for i in range(100)])  # more tokens than the text encoder embeds
    tokenizer.save_pretrained(base / "tokenizer")
    assert main([*args, f"data.root={data}", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not belong together" in err[0] and not run.exists()
    import shutil

    shutil.rmtree(base / "text_encoder")
    assert (
        main([*args, f"data.root={data}", "--out", str(run), "--quiet"]) == 2
    )  # now not a text pipeline: pixel path refuses it
    assert not run.exists()


def test_class_labelled_data_through_a_prompt_template_is_sampled_by_class(tmp_path):
    """A class folder (gray images) on a text pipeline: each image captioned by the template with its class name,
    the net then class-conditional on those prompts: a class grid, --label, and evaluate's downstream accuracy."""
    from privdiff.core.stages import recipe_dataset
    from privdiff.config import resolve_recipe
    from tests.helpers import image_folder

    rng = np.random.default_rng()
    base = tmp_path / "base"
    tiny_sd_pipeline(base, seed=int(rng.integers(0, 10_000)))
    data = image_folder(tmp_path / "pets", rng, classes={"cat": 8, "dog": 8}, mode="L", size=20)
    run = tmp_path / "run"
    args = [
        str(ROOT / "recipes/sd-dp-ldm.yaml"),
        *TINY,
        f"model.pretrained={base}",
        f"data.root={data}",
        "data.holdout=0.25",
        "data.prompt_template=a photo of a {}",
    ]
    recipe = resolve_recipe(args[0], args[1:])
    train = recipe_dataset(recipe, split="train")
    assert train.channels == 3 and train.resolution == 16 and train.class_names == ("cat", "dog")
    assert train.example_digests is not None  # the labelled images' own identities in the budget registry
    assert main(["train", *args, "--out", str(run), "--quiet"]) == 0
    with np.load(run / "samples" / "samples.npz") as f:  # the run's grid: a row per class, from its class prompt
        assert f["images"].shape == (20, 3, 16, 16) and list(f["labels"]) == [0] * 10 + [1] * 10
    net = Run(run).load_net(ema=True)
    assert net.class_prompts == ("a photo of a cat", "a photo of a dog") and net.num_classes == 2
    ids = net.conditions(labels=torch.tensor([1, 0]), n=2)
    assert torch.equal(ids, net.tokenize(["a photo of a dog", "a photo of a cat"]))
    out = tmp_path / "dogs.npz"
    assert main(["sample", str(run), "--label", "dog", "--n", "2", "--out", str(out), "--quiet"]) == 0
    with np.load(out) as f:
        assert f["images"].shape == (2, 3, 16, 16) and (f["labels"] == 1).all()
    assert main(["train", *args, "data.prompt_template=a photo", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()


def test_captioned_images_are_the_same_examples_as_in_an_image_folder(tmp_path):
    """The budget registry's per-example identity of a captioned image is its pixels' digest, whatever its caption:
    a run on the captioned folder and one on the same PNGs as a class folder compose on the same examples."""
    from privdiff.data.captioned import load_captioned_folder
    from privdiff.data.files import read_folder

    data = _captioned(tmp_path / "images", np.random.default_rng(), 5)
    captioned = load_captioned_folder(data, resolution=8)
    (tmp_path / "folder" / "any").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "folder" / "any" / f"{i}.png").write_bytes((data / f"{i}.png").read_bytes())
    folder = read_folder(tmp_path / "folder", resolution=12)
    assert np.array_equal(captioned.digests, folder.digests)
    # the identity is the file's own pixels, not the pipeline's conversion of them (a 1-channel pipeline's gray)
    assert np.array_equal(load_captioned_folder(data, resolution=8, channels=1).digests, folder.digests)
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace('"text": "', '"text": "new '))
    recaptioned = load_captioned_folder(data, resolution=8)
    assert np.array_equal(recaptioned.digests, captioned.digests) and recaptioned.fingerprint != captioned.fingerprint
