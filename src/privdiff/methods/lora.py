"""LoRA fine-tuning on a small private member set, plain or defended against membership inference.

Stages, all on the shared core (:func:`~privdiff.core.training.train_denoiser`):

1. ``pretrain`` (public): the recipe's pixel UNet learns to denoise the public data (``lora.public_data``,
   scikit-learn's digits by default, framed and sharpened as DP-LDM's public stages do).
2. ``lora`` (the member set D_tr = member_aux ∪ member_test of ``RUN/splits.json``): peft LoRA
   adapters (rank r, scale α/r) on the pretrained UNet; only A and B train. The objective is
   ``lora.objective``:

   * ``lora``        L_ada (per example: ℓ_ada = λ(σ)‖D(x₀ + σn; σ) − x₀‖², EDM eq. 8)
   * ``privatelora`` L_PL  = ℓ_ada − λ·CE_member            (MP-LoRA, PrivateLoRA eq. 6: ℓ_ada + λ·G)
   * ``stable``      L_SPL = ℓ_ada / (1 + λ·CE_member + δ)  (SMP-LoRA, eq. 10: ℓ_ada / (1 − λ·G + δ))

   CE_member = −log h_ω(e) is the proxy attacker's cross-entropy on the member's squared-error map
   e = (ε̂(x₀ + σ'ε', σ') − ε')² at a fresh (σ', ε'), computed INSIDE the autograd graph of the
   LoRA weights (the pitfall of the reference note, §7.1: detached errors give ∇G = 0 and the
   defense silently becomes plain LoRA). With ``lora.attacker_feature: loss`` h_ω reads
   [log mean(e), onehot(t)] at a Goldilocks t instead of the map (see :mod:`privdiff.core.proxy`
   for why: on small member sets the map proxy learns the auxiliary images, not membership). The paper trains with batch 1, so its batch ratio is this
   per-example ratio. After each LoRA step, ``lora.attacker_steps`` steps of h_ω (Adam) on a balanced
   batch of member_aux and nonmember_aux maps (features without gradient), as the released code.

On a Stable-Diffusion-style pipeline (``model.pretrained: PIPELINE``, captioned images in ``data.root``: the
papers' own setting) there is no pretraining stage: the pipeline is the public prior (named in the ledger),
the member pool is the captioned images as the frozen VAE's latents, the adapters go on the UNet's
``lora.targets`` (peft, through diffusers), the condition is each example's caption read by the frozen text
encoder (dropped to the empty prompt with p = ``diffusion.label_dropout``), and the objective is the net's own
(ε or v on its β schedule, t ~ U{0..T−1}); the proxy attacker reads the same captions and timesteps.

The ledger's private data is the member set, its one event the ``lora`` stage; pretraining is a
public stage. With ``privacy.enabled: false`` the event is non-private (ε = ∞: plain LoRA is not
DP). With ``privacy.enabled: true`` the ``lora`` objective is trained by the shared DP-SGD path
(Poisson sampling at q = batch/|D_tr|, per-example clipping of the LoRA gradients, Gaussian noise
calibrated to ``privacy.epsilon``), and the ledger's ε is the accountant's for the steps that ran.
PrivateLoRA / Stable PrivateLoRA are refused with DP (config validation): their attacker trains
on member_aux outside DP-SGD, and every LoRA step reads it through ω, which no accountant covers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..config import Recipe
from ..core.denoisers import default_device, load_decoder, pixel_net
from ..core.generation import sample_class_grid
from ..core.pipelines import (
    absolute_pretrained,
    caption_condition,
    captioned_latents,
    only_lora_trains,
    weights_identity,
)
from ..core.proxy import ProxyAttacker, feature_dim, member_gain, proxy_features
from ..core.stages import MethodResult, pretrain, private_dataset, public_data
from ..core.training import Stage, check_stage, train_denoiser, training_sigma_distribution
from ..data import ImageDataset
from ..data.membership import MembershipSplits, split_pool
from ..diffusion.discrete import DiscreteSigma
from ..models.lora import LoRASpec, LoRAUNetNet, lora_parameters
from ..models.pretrained import add_lora, is_text_pipeline, load_text_pipeline
from ..privacy.budget import check_plan, open_ledger
from ..runs import open_run

__all__ = ["PrivacyTerm", "train"]

STAGE = "lora"  # the ledger stage of the adaptation on the members


def _eps_fn(denoiser: torch.nn.Module):
    """ε̂(x, σ, c) = (x − D(x; σ, c)) / σ of a (possibly wrapped) denoiser, differentiable."""

    def eps(x, sigma, cond):
        return (x - denoiser(x, sigma, cond)) / sigma.view(-1, *([1] * (x.ndim - 1)))

    return eps


class PrivacyTerm:
    """PrivateLoRA's privacy term and its proxy attacker h_ω (one instance per training run): an
    :class:`~privdiff.core.training.ExtraTerm` of the LoRA stage.

    :meth:`objective` is the per-example training objective; :meth:`after_step` the attacker's steps;
    :meth:`state_dict` (h_ω, its Adam and the term's generator) is checkpointed with the network, so a
    resumed run continues the attacker where the checkpoint left it instead of starting a fresh one.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        members: ImageDataset,
        member_aux: ImageDataset,
        nonmember_aux: ImageDataset,
        device: torch.device,
        log: Path | None = None,
        conditions=None,
        sigma_dist=None,
        sigmas: torch.Tensor | None = None,
    ):
        """``conditions(dataset)``: the examples' conditions (default: their labels; a pipeline's: caption token
        ids); ``sigma_dist`` / ``sigmas``: the net's training p(σ) and timestep table (default: the recipe's p(σ),
        DDPM's linear table)."""
        if recipe.privacy.enabled:  # its attacker reads member_aux and nonmember_aux outside any accountant
            raise ValueError(
                f"lora.objective={recipe.lora.objective} trains its proxy attacker without DP: set privacy.enabled=false"
            )
        L = recipe.lora
        self.kind, self.lam, self.delta, self.feature = L.objective, L.lam, L.stabilizer, L.attacker_feature
        self.device = device
        cond = conditions or (lambda ds: ds.labels)
        self.x_m, self.c_m = members.images.to(device), cond(members).to(device)
        self.aux = {
            True: (member_aux.images.to(device), cond(member_aux).to(device)),
            False: (nonmember_aux.images.to(device), cond(nonmember_aux).to(device)),
        }
        self.sigma_dist = sigma_dist or training_sigma_distribution(recipe)
        self.sigmas = sigmas
        self.g = torch.Generator(device=device).manual_seed(recipe.train.seed * 1000 + 11)
        with torch.random.fork_rng(devices=[]):  # h_ω's initial weights: a function of the seed, not of what ran before
            torch.manual_seed(recipe.train.seed * 1000 + 12)
            self.attacker = (
                ProxyAttacker(feature_dim(L.attacker_feature, tuple(members.images.shape[1:]))).to(device).train()
            )
        self.opt = torch.optim.Adam(self.attacker.parameters(), lr=L.attacker_lr, weight_decay=L.attacker_weight_decay)
        self.batch, self.k = L.attacker_batch, L.attacker_steps
        self.module: torch.nn.Module | None = None  # the denoiser being trained, as the training loop passes it
        self.log = log
        self.logged = 0  # lines this run has written to ``log`` (a resume drops the ones after its checkpoint)

    def state_dict(self) -> dict:
        """h_ω's weights, its Adam state, the generator of (σ', ε') and of the attacker batches, and the log length."""
        return {
            "attacker": self.attacker.state_dict(),
            "optimizer": self.opt.state_dict(),
            "generator": self.g.get_state(),
            "logged": self.logged,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; ``log`` loses the lines written after it (replayed steps log again)."""
        self.attacker.load_state_dict(state["attacker"])
        self.opt.load_state_dict(state["optimizer"])
        self.g.set_state(state["generator"].to(torch.uint8))
        self.logged = int(state["logged"])
        if self.log is not None and self.log.is_file():
            kept = self.log.read_text().splitlines(keepends=True)[: self.logged]
            atomic_write_text(self.log, "".join(kept))

    def _map(self, module: torch.nn.Module, x0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # h_ω's input at a fresh (σ', ε') per example, separate from the (σ, n) of ℓ_ada
        return proxy_features(
            _eps_fn(module), x0, c, kind=self.feature, sigma_dist=self.sigma_dist, generator=self.g, sigmas=self.sigmas
        )

    def ce_member(self, module: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        """CE_member = −log h_ω(e(x₀)) per member example of ``idx``, differentiable in the LoRA weights."""
        idx = idx.to(self.device)
        e = self._map(module, self.x_m[idx], self.c_m[idx])  # kept in the graph: NOT detached
        return -member_gain(self.attacker, e, member=True)

    def objective(self, module: torch.nn.Module, idx: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        self.module = module
        ce = self.ce_member(module, idx)
        if self.kind == "privatelora":
            # L_PL = ℓ_ada + λ·G = ℓ_ada − λ·CE_member
            return loss - self.lam * ce
        # L_SPL = ℓ_ada / (1 − λ·G + δ) = ℓ_ada / (1 + λ·CE_member + δ)
        return loss / (1.0 + self.lam * ce + self.delta)

    def after_step(self, step: int) -> None:
        """k ascent steps on G for ω: CE on a balanced batch of member_aux / nonmember_aux maps (LoRA frozen)."""
        if self.module is None:
            return
        was_training = self.module.training
        self.module.eval()
        for _ in range(self.k):
            feats, labels = [], []
            for member in (True, False):
                x, c = self.aux[member]
                pick = torch.randint(0, len(x), (self.batch,), generator=self.g, device=self.device)
                with torch.no_grad():
                    feats.append(self._map(self.module, x[pick], c[pick]))
                labels.append(torch.full((self.batch,), int(member), device=self.device))
            e, y = torch.cat(feats), torch.cat(labels)
            self.opt.zero_grad(set_to_none=True)  # also drops the grads the LoRA step left on ω
            logits = self.attacker(e)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            self.opt.step()
            if self.log is not None and step % 25 == 0:
                acc = float((logits.argmax(1) == y).float().mean())
                with open(self.log, "a") as f:
                    f.write(json.dumps({"step": step + 1, "attacker_ce": loss.item(), "attacker_acc": acc}) + "\n")
                self.logged += 1
        self.opt.zero_grad(set_to_none=True)
        self.module.train(was_training)


def load_public(recipe: Recipe, *, like: ImageDataset) -> ImageDataset:
    """The public pretraining data: ``lora.public_*`` framed like ``like`` (:func:`~privdiff.core.stages.public_data`)."""
    return public_data(recipe, like=like, section="lora")


def _splits(recipe: Recipe, pool: ImageDataset, out: str | Path) -> tuple[MembershipSplits, Path, bool]:
    """The run's membership splits of ``pool``: drawn now from the seed (a fresh run) or read back (a resumed one)."""
    path = Path(out) / "splits.json"
    if path.is_file():
        return MembershipSplits.load(path), path, False
    d = recipe.data
    splits = split_pool(
        pool, n_per_role=recipe.lora.n_per_role, seed=recipe.train.seed, root=d.root, resolution=d.resolution
    )
    return splits, path, True


def _attacker_data(recipe: Recipe, splits: MembershipSplits, pool: ImageDataset) -> ImageDataset | None:
    """The non-members a defense's proxy attacker trains on (None for plain LoRA): read without DP, they shape the
    released adapters through ω, so the ledger and the registry count them with the members (ε = ∞ for both)."""
    return None if recipe.lora.objective == "lora" else splits.dataset("nonmember_aux", pool)


def _term(recipe: Recipe, run, splits: MembershipSplits, pool: ImageDataset, members: ImageDataset, **kwargs):
    """PrivateLoRA's / Stable PrivateLoRA's :class:`PrivacyTerm` for the run (None for plain LoRA); a fresh LoRA stage
    drops the attacker-log lines of an attempt killed before its first checkpoint."""
    if recipe.lora.objective == "lora":
        return None
    if run.resume_checkpoint(what=STAGE) is None:
        (run.path / "attacker_log.jsonl").unlink(missing_ok=True)
    return PrivacyTerm(
        recipe,
        members=members,
        member_aux=splits.dataset("member_aux", pool),
        nonmember_aux=splits.dataset("nonmember_aux", pool),
        device=default_device(),
        log=run.path / "attacker_log.jsonl",
        **kwargs,
    )


def train_on_pipeline(
    recipe: Recipe, *, out: str | Path, progress: bool = True, grid_per_class: int = 10
) -> MethodResult:
    """LoRA, PrivateLoRA, Stable PrivateLoRA or DP-SGD LoRA of a Stable-Diffusion-style pipeline's UNet on the
    members of a captioned image pool (see the module docstring); a grid of empty-prompt samples at the end
    (never a private caption)."""
    recipe = absolute_pretrained(recipe)
    pretrained = recipe.model.pretrained
    L, device = recipe.lora, default_device()
    net = load_text_pipeline(pretrained)
    pool, _ = captioned_latents(recipe, net)  # the captioned images as latents (data.holdout's test part never)
    splits, path, fresh_splits = _splits(recipe, pool, out)
    members = splits.members(pool)  # the only examples LoRA trains on
    # everything that can fail is checked before the run writes anything or reserves budget
    with torch.random.fork_rng(devices=[]):  # the adapters' initial A: a function of the seed, not of what ran before
        torch.manual_seed(recipe.train.seed)
        add_lora(net, rank=L.rank, alpha=L.alpha, target_modules=L.targets)
    check_stage(stage=STAGE, num_examples=len(members), train=recipe.train)
    check_plan(out, recipe, members, stage=STAGE)
    run = open_run(out, recipe, class_names=None)
    with run.starting():  # a start that still fails removes what it created
        if fresh_splits:
            run.created(path)
            splits.save(path)
        ledger = open_ledger(run, recipe, members, stage=STAGE, also_touched=_attacker_data(recipe, splits, pool))
        ledger.record_public(stage="pretrained", data=weights_identity(Path(pretrained)), steps=0)
        ledger.save(run.ledger_path)

    def ids(dataset: ImageDataset) -> torch.Tensor:
        return net.tokenize(list(dataset.captions))

    sigmas = DiscreteSigma(net.schedule)
    term = _term(recipe, run, splits, pool, members, conditions=ids, sigma_dist=sigmas, sigmas=net.schedule.sigmas())
    stage = Stage(
        name=STAGE,
        init=lambda: net,
        select=only_lora_trains,
        condition=caption_condition(
            ids(members), net.null_condition(), p=recipe.diffusion.label_dropout, device=device
        ),
        sigmas=sigmas,
    )
    result = train_denoiser(
        run=run, recipe=recipe, dataset=members, ledger=ledger, stage=stage, term=term, progress=progress
    )
    grid = sample_class_grid(  # the empty prompt: grid_per_class rows of 10
        run,
        recipe,
        result.denoiser,
        num_classes=None,
        per_class=grid_per_class,
        decode=load_decoder(run),
        progress=progress,
    )
    return MethodResult(run=run, grid=grid, ledger=ledger, steps=result.steps)


def train(recipe: Recipe, *, out: str | Path, progress: bool = True, grid_per_class: int = 10) -> MethodResult:
    """Pretrain on public data, record the membership splits, LoRA-adapt on the members; sample a class grid.
    With ``model.pretrained`` a text-to-image pipeline: :func:`train_on_pipeline`."""
    if is_text_pipeline(recipe.model.pretrained):
        return train_on_pipeline(recipe, out=out, progress=progress, grid_per_class=grid_per_class)
    L = recipe.lora
    pool = private_dataset(recipe)
    public = load_public(recipe, like=pool)
    splits, path, fresh_splits = _splits(recipe, pool, out)
    members = splits.members(pool)  # the only examples LoRA trains on
    spec = LoRASpec(rank=L.rank, alpha=L.alpha, targets=tuple(L.targets))
    # everything that can fail is checked before the run writes anything or reserves budget
    check_stage(stage="pretrain", num_examples=len(public), train=L.pretrain, build=lambda: pixel_net(recipe, public))
    check_stage(
        stage=STAGE,
        num_examples=len(members),
        train=recipe.train,
        build=lambda: LoRAUNetNet.from_base(pixel_net(recipe, public), spec),
    )
    check_plan(out, recipe, members, stage=STAGE)
    run = open_run(out, recipe, class_names=pool.class_names)
    with run.starting():  # a start that still fails removes what it created
        if fresh_splits:
            run.created(path)
            splits.save(path)
        # the registry reserves what this stage will record
        ledger = open_ledger(run, recipe, members, stage=STAGE, also_touched=_attacker_data(recipe, splits, pool))
        pre = pretrain(run, recipe, public, train=L.pretrain, ledger=ledger, progress=progress)

    def select(net: torch.nn.Module) -> None:
        net.requires_grad_(False)
        for p in lora_parameters(net):
            p.requires_grad_(True)

    term = _term(recipe, run, splits, pool, members)
    stage = Stage(name=STAGE, init=lambda: LoRAUNetNet.from_base(pre.denoiser.net, spec), select=select)
    result = train_denoiser(
        run=run, recipe=recipe, dataset=members, ledger=ledger, stage=stage, term=term, progress=progress
    )
    grid = sample_class_grid(
        run, recipe, result.denoiser, num_classes=pool.num_classes, per_class=grid_per_class, progress=progress
    )
    return MethodResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
