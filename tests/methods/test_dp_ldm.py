"""DP-LDM: the latent network, its private fine-tuning of a subset, its autoencoder and its prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.cli import main
from privdiff.data.captions import caption, caption_variants
from privdiff.diffusion import Denoiser, LogNormalSigma, denoising_loss, draw_training_noise
from privdiff.models.latent import LatentUNetConfig, build_latent_net, select_trainable
from privdiff.models.text import TextConfig, WordTokenizer, build_text_encoder
from privdiff.privacy.accounting import epsilon
from tests.helpers import assert_latent_net_same, jitter

ROOT = Path(__file__).resolve().parents[2]
NAMES = tuple(str(d) for d in range(10))  # the digit data sets' class names
TINY_LDM = [
    "data.resolution=16",
    "ldm.public_margin=2",
    "ldm.autoencoder.channels=[8,16]",
    "ldm.autoencoder.norm_num_groups=4",
    "ldm.autoencoder.epochs=0.5",
    "ldm.unet.channels=[16,32]",
    "ldm.unet.attention_heads=2",
    "ldm.unet.norm_num_groups=8",
    "ldm.text.width=16",
    "ldm.text.layers=1",
    "ldm.text.heads=2",
    "ldm.pretrain.batch_size=64",
    "ldm.pretrain.max_steps=4",
    "train.batch_size=32",
    "train.max_steps=3",
    "privacy.noise_multiplicity=2",
    "train.max_physical_batch_size=64",
    "sampler.steps=4",
]


def tiny_net(num_classes: int = 10, text: TextConfig = TextConfig(width=16, layers=1, heads=2)):
    return build_latent_net(
        LatentUNetConfig(channels=(16, 32), attention_heads=2, norm_num_groups=8),
        build_text_encoder(text, class_names=(NAMES,)),
        latent_channels=4,
        latent_size=4,
        num_classes=num_classes,
    )


def test_prompts_reach_the_output():
    """Same noise, same σ, two prompts: different denoised outputs (the text path is wired in)."""
    torch.manual_seed(0)
    den = Denoiser(jitter(tiny_net(), 1), sigma_data=1.0).eval()
    net = den.net
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 1.5)
    a = den(x, sigma, net.conditions(prompts=["a handwritten digit seven"], n=2))
    b = den(x, sigma, net.conditions(prompts=["a handwritten digit one"], n=2))
    same = den(x, sigma, net.conditions(prompts=["a handwritten digit seven"], n=2))
    assert torch.equal(a, same) and (a - b).abs().max() > 1e-3
    # a label and a prompt are both read; "no class, no text" is the null row
    assert not torch.equal(
        den(x, sigma, net.conditions(labels=torch.tensor([7, 7]), n=2)), den(x, sigma, net.conditions(n=2))
    )
    assert (
        net.conditions(n=1)[0].tolist()
        == net.null_condition().tolist()
        == [10] + [0] * net.text_encoder.tokenizer.max_length
    )


def test_tokenizer_knows_every_caption_and_flags_unknown_words(capsys):
    tok = WordTokenizer.for_classes(NAMES)
    ids = tok.encode([c for n in NAMES for c in caption_variants(n)])
    assert (ids != 1).all()  # no <unk> in any caption
    assert "a handwritten digit seven" in caption_variants("7") and "the number 7" in caption_variants("7")
    assert torch.equal(tok.encode(["A handwritten digit SEVEN!"]), tok.encode(["a handwritten digit seven"]))
    unk = tok.encode(["a handwritten zebra"], warn=True)
    assert unk[0, 2] == 1 and "zebra" in capsys.readouterr().err


@pytest.mark.parametrize("K", [1, 3])
def test_per_example_gradients_of_the_trainable_subset_match_one_example_at_a_time(K):
    """Book-keeping clipping on the cross-attention UNet with only attention blocks + class embedder trainable."""
    torch.manual_seed(2)
    net = jitter(tiny_net(), 3)
    n, total = select_trainable(net, ("attentions", "class_embedder"))
    assert 0 < n < total
    assert_latent_net_same(net, K)


def test_select_trainable_names_groups_and_refuses_typos():
    net = tiny_net()
    n_cross, total = select_trainable(net, ("cross_attention",))
    assert all(("attn2" in name) == p.requires_grad for name, p in net.named_parameters())
    assert select_trainable(net, ("unet.conv_in.*",))[0] == sum(p.numel() for p in net.unet.conv_in.parameters())
    with pytest.raises(ValueError, match="matches no parameter"):
        select_trainable(net, ("attention",))


def test_autoencoder_round_trip_on_held_out_public_images():
    """Trained on 1,500 public digits for 150 steps, it reconstructs the other 297 with MSE < 0.02 (pixels in [-1, 1];
    measured 0.0024, against 0.65 untrained)."""
    from privdiff.data import load_dataset
    from privdiff.models.autoencoder import AutoencoderConfig, autoencoder_loss, build_autoencoder

    torch.manual_seed(0)
    data = load_dataset("digits", split="all", resolution=16).images
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    train, held_out = data[perm[:1500]], data[perm[1500:]]
    ae = build_autoencoder(AutoencoderConfig(channels=(16, 32)), in_channels=1, resolution=16)
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        x = train[torch.randint(0, len(train), (64,), generator=g)]
        loss = autoencoder_loss(ae, x, kl_weight=1e-4, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ae.eval()
        recon = ae.decode(ae.encode(held_out).latent_dist.mean).sample
    mse = float((recon - held_out).square().mean())
    assert mse < 0.02, mse


@pytest.mark.slow
def test_dp_ldm_end_to_end(tmp_path, capsys):
    """Three stages, a ledger of the private stage only, frozen weights untouched, prompts and labels, evaluate."""
    from privdiff.runs import Run

    run = tmp_path / "ldm"
    assert main(["train", str(ROOT / "recipes/dp-ldm-mnist5k.yaml"), *TINY_LDM, "--out", str(run), "--quiet"]) == 0, (
        capsys.readouterr().err
    )
    assert "(diffusers UNet2DConditionModel.from_pretrained)" in capsys.readouterr().out  # the latent net's class
    ledger = json.loads((run / "ledger.json").read_text())
    assert [e["stage"] for e in ledger["events"]] == ["dp_sgd"] and ledger["events"][0]["steps"] == 3
    assert [s["stage"] for s in ledger["public_stages"]] == ["autoencoder", "pretrain"]
    assert {s["data"]["name"] for s in ledger["public_stages"]} == {"digits"}
    assert all(s["data"]["fingerprint"] != ledger["dataset"]["fingerprint"] for s in ledger["public_stages"])
    hist = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["events"]]
    assert ledger["epsilon"] == pytest.approx(epsilon(hist, delta=ledger["delta"], accountant="rdp"))

    # frozen parameters are bitwise the pretrained ones; trainable ones moved
    pretrained = Run(run / "stages" / "pretrain").load_net(ema=True)
    final = Run(run).load_net(ema=False)
    final_ema = Run(run).load_net(ema=True)
    select_trainable(pretrained, ("attentions", "class_embedder"))
    moved = 0
    for (name, p0), p1, p2 in zip(pretrained.named_parameters(), final.parameters(), final_ema.parameters()):
        if p0.requires_grad:
            moved += int(not torch.equal(p0, p1))
        else:
            assert torch.equal(p0, p1) and torch.equal(p0, p2), name
    assert moved > 0

    for args in (["--prompt", "a handwritten digit seven"], ["--label", "7"]):
        out = tmp_path / f"{args[0][2:]}.png"
        assert main(["sample", str(run), "--n", "4", *args, "--out", str(out), "--quiet"]) == 0
        assert out.stat().st_size > 0
    assert main(["budget", "show", str(run)]) == 0
    assert capsys.readouterr().out.count("not part of epsilon") == 2
    npz = np.load(run / "samples" / "samples.npz")
    assert npz["images"].shape == (100, 1, 16, 16)
    assert main(["sample", str(tmp_path), "--prompt", "x", "--quiet"]) != 0  # not a run: one-line error


@pytest.fixture
def local_bert(tmp_path):
    """A tiny BERT text model and word-piece tokenizer written to disk (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    words = sorted({w for n in NAMES for c in caption_variants(n) for w in c.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(5)
    transformers.BertModel(config).save_pretrained(tmp_path)
    return tmp_path


def test_a_local_hugging_face_text_encoder(local_bert, tmp_path):
    """ldm.text.encoder=PATH: the model is read from disk, frozen, projected to the cross-attention width; prompts
    steer the output; a saved net loads back identical."""
    from privdiff.models.latent import LatentNet

    net = tiny_net(text=TextConfig(encoder=str(local_bert), width=16, max_length=8))
    enc = net.text_encoder
    assert not any(p.requires_grad for p in enc.model.parameters()) and enc.proj.weight.requires_grad
    null = net.null_condition()
    assert null[0] == 10 and null[1] == 2 and null[2] == 3  # no class; [CLS] [SEP] of the empty prompt
    den = Denoiser(jitter(net, 6), sigma_data=1.0).eval()
    x, sigma = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7)), torch.full((2,), 1.0)
    a = den(x, sigma, net.conditions(prompts=["a handwritten digit seven"], n=2))
    b = den(x, sigma, net.conditions(prompts=["a handwritten digit one"], n=2))
    assert (a - b).abs().max() > 1e-3
    net.save_pretrained(tmp_path / "saved")
    back = Denoiser(LatentNet.from_pretrained(tmp_path / "saved"), sigma_data=1.0).eval()
    torch.testing.assert_close(back(x, sigma, net.conditions(prompts=["a handwritten digit seven"], n=2)), a)
    with pytest.raises(ValueError, match="no such directory"):
        tiny_net(text=TextConfig(encoder=str(tmp_path / "missing"), width=16))


def test_opacus_hooks_and_book_keeping_give_the_same_update_on_the_trainable_subset():
    from privdiff.privacy.dpsgd import DPSGD

    updates = {}
    for mode in ("hooks", "bk"):
        torch.manual_seed(2)
        net = jitter(tiny_net(), 3)
        select_trainable(net, ("attentions", "class_embedder"))
        den = Denoiser(net, sigma_data=1.0)
        B, K, g = 4, 2, torch.Generator().manual_seed(4)
        x0 = torch.randn(B, 4, 4, 4, generator=g)
        sigma, noise = draw_training_noise(x0, K=K, sigma_dist=LogNormalSigma(), generator=g)
        cond = net.conditions(
            labels=torch.randint(0, 10, (B * K,), generator=g),
            prompts=[caption(NAMES[i % 10]) for i in range(B * K)],
            n=B * K,
        ).view(B, K, -1)
        opt = torch.optim.SGD([p for p in den.parameters() if p.requires_grad], lr=1.0)
        engine = DPSGD(
            den,
            opt,
            num_examples=8,
            batch_size=4,
            noise_multiplicity=K,
            noise_multiplier=0.5,
            max_grad_norm=1e-2,
            grad_sample_mode=mode,
            generator=torch.Generator().manual_seed(0),
            noise_generator=torch.Generator().manual_seed(1),
        )
        before = [p.detach().clone() for p in den.parameters()]
        engine.step(
            torch.arange(B),
            lambda m, i: denoising_loss(m, x0[i], cond[i], sigma=sigma[i], noise=noise[i], loss_weight=den.loss_weight),
        )
        assert all(torch.equal(b, p) for b, p in zip(before, den.parameters()) if not p.requires_grad)
        updates[mode] = torch.cat(
            [(b - p.detach()).flatten() for b, p in zip(before, den.parameters()) if p.requires_grad]
        )
    torch.testing.assert_close(updates["bk"], updates["hooks"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_dp_ldm_resume_continues_the_private_stage_with_the_same_frozen_part(tmp_path, capsys):
    """A run stopped after 2 private steps and continued to 4: the ledger counts 4, the public stages are not
    redone, and the parameters frozen at the start are still the pretrained ones after the resume."""
    from privdiff.runs import Run

    run = tmp_path / "ldm"
    base = [a for a in TINY_LDM if not a.startswith("train.max_steps")]
    assert (
        main(
            [
                "train",
                str(ROOT / "recipes/dp-ldm-mnist5k.yaml"),
                *base,
                "train.max_steps=2",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    public_log = [e for e in Run(run).read_train_log() if e["stage"] != "dp_sgd"]
    assert (
        main(
            [
                "train",
                str(ROOT / "recipes/dp-ldm-mnist5k.yaml"),
                *base,
                "train.max_steps=4",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    ), capsys.readouterr().err
    ledger = json.loads((run / "ledger.json").read_text())
    assert [(e["stage"], e["steps"]) for e in ledger["events"]] == [("dp_sgd", 4)]
    assert [e for e in Run(run).read_train_log() if e["stage"] != "dp_sgd"] == public_log  # nothing public ran again
    pretrained = Run(run / "stages" / "pretrain").load_net(ema=True)
    final = Run(run).load_net(ema=False)
    select_trainable(pretrained, ("attentions", "class_embedder"))
    for (name, p0), p1 in zip(pretrained.named_parameters(), final.parameters()):
        if not p0.requires_grad:
            assert torch.equal(p0, p1), name


@pytest.mark.parametrize(
    "recipe,section,other", [("dp-ldm-mnist5k.yaml", "ldm", "lora"), ("lora-mnist5k.yaml", "lora", "ldm")]
)
def test_public_data_errors_name_the_keys_of_the_section_that_set_them(recipe, section, other):
    """DP-LDM reads ldm.public_*, LoRA's pretraining lora.public_*: each error names the key the user wrote."""
    from privdiff.config import RecipeError, resolve_recipe
    from privdiff.data import DatasetError, ImageDataset, load_dataset
    from privdiff.methods import dp_ldm, lora

    load = dp_ldm.load_public if section == "ldm" else lora.load_public
    like = load_dataset("digits", split="all", resolution=16)
    cases = [
        (f"{section}.public_margin=7", ValueError, f"{section}.public_margin=7 leaves no image at resolution 16"),
        (f"{section}.public_data=nope", DatasetError, f"{section}.public_data=nope: 'nope': unknown data set"),
    ]
    for override, error, message in cases:
        r = resolve_recipe(ROOT / "recipes" / recipe, [override])
        with pytest.raises(error) as e:
            load(r, like=like)
        assert str(e.value).startswith(message) and f"{other}." not in str(e.value)
    with pytest.raises(
        RecipeError, match=rf"^{section}\.public_contrast must be a finite number in \[0, 100\], got -1.0$"
    ):
        resolve_recipe(ROOT / "recipes" / recipe, [f"{section}.public_contrast=-1.0"])
    with pytest.raises(RecipeError, match=rf"^{section}\.public_margin must be an integer in \[0, 4096\], got -1$"):
        resolve_recipe(
            ROOT / "recipes" / recipe, [f"{section}.public_margin=-1"]
        )  # refused when the recipe is resolved
    rgb = ImageDataset(
        images=torch.zeros(2, 3, 16, 16),
        labels=torch.zeros(2, dtype=torch.long),
        num_classes=10,
        name="rgb",
        split="train",
        fingerprint="sha256:rgb",
    )
    with pytest.raises(
        ValueError, match=rf"^{section}\.public_data=digits has 1 channels and 10 classes, private rgb 3 and 10"
    ):
        load(resolve_recipe(ROOT / "recipes" / recipe), like=rgb)


def test_lora_public_data_is_framed_and_sharpened_by_its_own_keys():
    """lora.public_margin / lora.public_contrast (not ldm.*'s defaults) shape the public images: against the formula."""
    import math

    import torch.nn.functional as F

    from privdiff.config import resolve_recipe
    from privdiff.data import load_dataset
    from privdiff.methods.lora import load_public

    like = load_dataset("digits", split="all", resolution=16)
    r = resolve_recipe(
        ROOT / "recipes/lora-mnist5k.yaml",
        ["lora.public_margin=3", "lora.public_contrast=1.7", "ldm.public_margin=1", "ldm.public_contrast=0.0"],
    )
    got = load_public(r, like=like).images
    raw = load_dataset("digits", split="all", resolution=10).images
    want = F.pad(torch.tanh(1.7 * raw) / math.tanh(1.7), (3, 3, 3, 3), value=-1.0)
    assert got.shape == (len(raw), 1, 16, 16)
    torch.testing.assert_close(got, want)
