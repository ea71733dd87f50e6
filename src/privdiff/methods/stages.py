"""Stages every method composes: train a denoiser (private or not) and sample from it.

There is one training loop in privdiff, :func:`train_denoiser`. A method is a short recipe
that calls it (and other stages) with its data and its trainable parameters.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Recipe
from ..data import ImageDataset
from ..diffusion import Denoiser, denoising_loss, draw_training_noise, drop_labels, guided_denoiser, make_sigma_distribution, sample
from ..models import UNetNet, build_unet, count_parameters
from ..privacy.accounting import calibrate_noise
from ..privacy.dpsgd import DPSGD, NonPrivateSGD
from ..privacy.ledger import NON_PRIVATE, SUBSAMPLED_GAUSSIAN, Ledger
from ..runs import Run, RunError, TrainingState


def default_device() -> torch.device:
    """CUDA when present, else CPU: privdiff never requires a GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_denoiser(recipe: Recipe, unet) -> Denoiser:
    """Wrap a UNet in the recipe's preconditioning (EDM or v)."""
    return Denoiser(UNetNet(unet), sigma_data=recipe.diffusion.sigma_data, parameterization=recipe.diffusion.parameterization)


def planned_steps(recipe: Recipe, num_examples: int) -> int:
    """Steps the noise is calibrated for: ``epochs / q`` with q = batch_size / N."""
    return max(1, round(recipe.train.epochs * num_examples / recipe.train.batch_size))


def load_ledger(run: Run, dataset: ImageDataset) -> Ledger | None:
    """The run's ledger, if any, checked against the private data it must describe."""
    if not run.ledger_path.exists():
        return None
    ledger = Ledger.load(run.ledger_path)
    if ledger.dataset.get("fingerprint") != dataset.fingerprint:
        raise RunError(f"{run.ledger_path}: recorded for data {ledger.dataset.get('fingerprint')}, "
                       f"but {dataset.name} now has {dataset.fingerprint}")
    return ledger


def open_ledger(run: Run, recipe: Recipe, dataset: ImageDataset) -> Ledger:
    """The run's ledger (continued on resume), or a new one for ``dataset``."""
    ledger = load_ledger(run, dataset)
    if ledger is not None:
        return ledger
    identity = {"name": dataset.name, "split": dataset.split, "fingerprint": dataset.fingerprint, "size": len(dataset)}
    return Ledger(
        delta=recipe.privacy.delta, accountant=recipe.privacy.accountant, dataset=identity,
        target_epsilon=recipe.privacy.epsilon if recipe.privacy.enabled else None,
    )


def noise_for(recipe: Recipe, ledger: Ledger, *, stage: str, num_examples: int) -> float:
    """σ calibrated so that everything in the ledger *before* ``stage`` plus this stage meets the target.

    Deterministic in (recipe, earlier stages), so a resumed run recomputes the same σ.
    """
    prior = ledger.history(exclude_stage=stage)
    return calibrate_noise(
        epsilon_target=recipe.privacy.epsilon,
        delta=recipe.privacy.delta,
        sample_rate=recipe.train.batch_size / num_examples,
        steps=planned_steps(recipe, num_examples),
        accountant=recipe.privacy.accountant,
        prior=prior,
    )


def learning_rate(recipe: Recipe, step: int, total: int) -> float:
    """lr at ``step`` of ``total``: constant, or cosine decay to 5% (a function of the step only, so resume-safe)."""
    lr = recipe.train.lr
    if recipe.train.lr_schedule == "cosine":
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return lr


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def training_sigma_distribution(recipe: Recipe):
    """The recipe's training noise-level distribution p(σ)."""
    d = recipe.diffusion
    if d.sigma_distribution == "lognormal":
        return make_sigma_distribution("lognormal", P_mean=d.P_mean, P_std=d.P_std)
    return make_sigma_distribution("cosine", logsnr_min=d.logsnr_min, logsnr_max=d.logsnr_max)


def make_engine(
    recipe: Recipe,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ledger: Ledger,
    stage: str,
    num_examples: int,
    generators: dict[str, torch.Generator],
) -> DPSGD | NonPrivateSGD:
    """DP-SGD with σ calibrated against the ledger, or the same step without privacy."""
    r = recipe
    common = dict(
        num_examples=num_examples, batch_size=r.train.batch_size, noise_multiplicity=r.privacy.noise_multiplicity,
        max_physical_batch_size=r.train.max_physical_batch_size, generator=generators["batches"],
    )
    if not r.privacy.enabled:
        return NonPrivateSGD(model, optimizer, **common)
    return DPSGD(
        model, optimizer, noise_multiplier=noise_for(r, ledger, stage=stage, num_examples=num_examples),
        max_grad_norm=r.privacy.max_grad_norm, noise_generator=generators["dp_noise"],
        grad_sample_mode=r.privacy.grad_sample_mode, **common,
    )


@dataclass
class TrainResult:
    denoiser: Denoiser  # the EMA weights, in eval mode
    steps: int
    stopped_at_budget: bool


def _generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    # Separate streams: which examples are sampled, the DP noise, and the diffusion noise/labels.
    names = ("batches", "dp_noise", "diffusion")
    return {n: torch.Generator(device="cpu" if n == "batches" else device).manual_seed(seed * 1000 + i) for i, n in enumerate(names)}


def train_denoiser(
    *,
    run: Run,
    recipe: Recipe,
    dataset: ImageDataset,
    ledger: Ledger,
    stage: str = "dp_sgd",
    progress: bool = True,
) -> TrainResult:
    """Train (privately unless ``privacy.enabled=false``) a class-conditional denoiser on ``dataset``.

    Resumes from the run's latest checkpoint. The ledger is written *before* each step touches
    the data, and a step that would take ε past ``privacy.epsilon`` is not taken.
    """
    r, device = recipe, default_device()
    torch.manual_seed(r.train.seed)
    gens = _generators(r.train.seed, device)
    N, K = len(dataset), r.privacy.noise_multiplicity
    num_classes = dataset.num_classes
    if r.train.batch_size > N:
        raise ValueError(f"train.batch_size={r.train.batch_size} is larger than the data set ({N} examples)")

    resume = run.latest_checkpoint() is not None
    if resume:
        state = run.load_checkpoint()
        unet, unet_ema, start = state.unet, state.unet_ema, state.step
        for name, g in gens.items():
            g.set_state(state.rng[name].to(torch.uint8))
    else:
        unet = build_unet(r.model, resolution=dataset.resolution, in_channels=dataset.channels, num_classes=num_classes)
        unet_ema, start = copy.deepcopy(unet), 0
    unet.to(device).train()
    unet_ema.to(device).eval().requires_grad_(False)
    denoiser, ema_denoiser = make_denoiser(r, unet), make_denoiser(r, unet_ema)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=r.train.lr)
    if resume:
        optimizer.load_state_dict(state.optimizer)

    q = r.train.batch_size / N
    total = planned_steps(r, N)
    if r.train.max_steps is not None:
        total = min(total, r.train.max_steps)
    engine = make_engine(r, denoiser, optimizer, ledger=ledger, stage=stage, num_examples=N, generators=gens)
    mech = dict(
        stage=stage,
        mechanism=SUBSAMPLED_GAUSSIAN if engine.private else NON_PRIVATE,
        noise_multiplier=engine.noise_multiplier,  # what the optimizer will actually draw
        sample_rate=engine.sample_rate,  # what the sampler actually uses
        max_grad_norm=engine.max_grad_norm,  # what the optimizer actually clips to
    )
    images, labels = dataset.images.to(device), dataset.labels.to(device)
    sigma_dist = training_sigma_distribution(r)

    def loss_fn(module: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        x0, y = images[idx.to(device)], labels[idx.to(device)]
        sigma_bk, noise = draw_training_noise(x0, K=K, sigma_dist=sigma_dist, generator=gens["diffusion"])
        y_bk = drop_labels(y[:, None].expand(-1, K), p=r.diffusion.label_dropout, null_label=num_classes, generator=gens["diffusion"])
        return denoising_loss(module, x0, y_bk, sigma=sigma_bk, noise=noise, loss_weight=denoiser.loss_weight)

    def checkpoint(step: int) -> None:
        rng = {n: g.get_state() for n, g in gens.items()}
        run.save_checkpoint(TrainingState(step=step, unet=unet, unet_ema=unet_ema, optimizer=optimizer.state_dict(), rng=rng))

    if start == 0 and progress:
        tqdm.write(
            f"{stage}: {count_parameters(unet):,} parameters, N={N}, q={q:.4f}, {total} steps, K={K}, "
            + (f"sigma={engine.noise_multiplier:.4f}, C={engine.max_grad_norm}" if engine.private else "non-private"),
            file=sys.stderr,
        )
    bar = tqdm(total=total, initial=start, desc=stage, unit="step", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    step, stopped = start, False
    steps_before = ledger.steps(stage)
    clock = run.rewind_train_log(stage=stage, step=start) - time.perf_counter()
    for step in range(start, total):
        if engine.private and ledger.epsilon(extra=[(engine.noise_multiplier, engine.sample_rate, 1)]) > r.privacy.epsilon * (1 + 1e-9):
            stopped = True
            tqdm.write(f"stopping at step {step}: one more step would exceed epsilon={r.privacy.epsilon}", file=sys.stderr)
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(r, step, planned_steps(r, N))
        indices = engine.batches.next()
        ledger.record(**mech)  # write-ahead: counted before the data is touched
        ledger.save(run.ledger_path)
        loss = engine.step(indices, loss_fn)
        if engine.private and engine.noised_steps != ledger.steps(stage) - steps_before:
            raise RuntimeError("internal error: noised steps and ledger disagree")  # never report an unbacked epsilon
        decay = min(r.train.ema_decay, (1 + step) / (10 + step))
        _ema_update(unet_ema, unet, decay)
        eps = ledger.epsilon() if engine.private else None
        run.append_train_log({"stage": stage, "step": step + 1, "loss": loss, "epsilon": eps,
                              "lr": optimizer.param_groups[0]["lr"], "time_s": round(clock + time.perf_counter(), 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", eps=f"{eps:.3f}" if engine.private else "inf", refresh=False)
        if (step + 1) % r.train.checkpoint_every == 0 and step + 1 < total:
            checkpoint(step + 1)
    else:
        step = total
    bar.close()
    if step > start or not resume:
        checkpoint(step)
    ledger.save(run.ledger_path)
    return TrainResult(denoiser=ema_denoiser, steps=step, stopped_at_budget=stopped)


def load_denoiser(run: Run, recipe: Recipe | None = None) -> Denoiser:
    """The EMA denoiser of a run's latest checkpoint, on the default device, in eval mode."""
    recipe = recipe or run.load_config()
    unet = run.load_unet(ema=True).to(default_device()).eval()
    return make_denoiser(recipe, unet)


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    *,
    labels: torch.Tensor | None,
    n: int,
    recipe: Recipe,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 250,
    progress: bool = True,
) -> np.ndarray:
    """Draw ``n`` images with the recipe's sampler; returns float32 [n, C, H, W] in [0, 1]."""
    s = recipe.sampler
    unet = denoiser.net.unet
    res, ch, num_classes = unet.config.sample_size, unet.config.in_channels, denoiser.net.num_classes
    device = next(denoiser.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in tqdm(range(0, n, batch_size), desc="sampling", unit="batch", disable=not progress, file=sys.stderr):
        y = None if labels is None else labels[start:start + batch_size].to(device)
        b = min(batch_size, n - start)
        fn = guided_denoiser(denoiser, y, guidance=s.guidance if y is not None else 0.0, null_label=num_classes)
        x = sample(
            fn, shape=(b, ch, res, res), sampler=s.name, steps=steps or s.steps, sigma_min=s.sigma_min,
            sigma_max=s.sigma_max, rho=s.rho, generator=g, device=device,
            **({"S_churn": s.S_churn, "S_min": s.S_min, "S_max": s.S_max, "S_noise": s.S_noise} if s.name in ("heun", "edm") else {}),
        )
        out.append(((x.clamp(-1, 1) + 1) / 2).float().cpu().numpy())
    return np.concatenate(out)


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels for a grid with one row per class: [0]*per_class + [1]*per_class + ..."""
    return torch.arange(num_classes).repeat_interleave(per_class)
