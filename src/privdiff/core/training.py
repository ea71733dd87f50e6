"""The one training loop of privdiff, :func:`train_denoiser`, and what it is made of.

A method is a short recipe that calls it (once per stage) with its data, a :class:`Stage` (the
network, what trains, the conditions, batch and epochs) and, for a private stage, the run's ledger.
The privacy side of every step is one object, :class:`~privdiff.privacy.budget.StepGuard`; an
extra loss term with its own state (PrivateLoRA's) is an :class:`ExtraTerm`; the canaries of an
empirical audit wrap the engine (:meth:`~privdiff.privacy.audit.GradientCanaries.wrap`).
"""

from __future__ import annotations

import copy
import math
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Recipe, TrainConfig
from ..data import ImageDataset
from ..diffusion import (
    Denoiser,
    SigmaDistribution,
    denoising_loss,
    draw_training_noise,
    drop_labels,
    make_sigma_distribution,
)
from ..distributed import agree, barrier, broadcast_object, current_world
from ..models import count_parameters
from ..privacy.budget import StepGuard, noise_for, planned_steps
from ..privacy.dpsgd import DPSGD, NonPrivateSGD
from ..privacy.ledger import Ledger
from ..runs import Run, RunError, TrainingState
from .denoisers import default_device, make_denoiser, pixel_net

if TYPE_CHECKING:
    from ..privacy.audit import GradientCanaries

__all__ = [
    "Conditioner",
    "ExtraTerm",
    "Stage",
    "TrainResult",
    "check_stage",
    "fresh_draws",
    "label_conditioner",
    "learning_rate",
    "make_engine",
    "train_denoiser",
    "training_sigma_distribution",
]


def learning_rate(train: TrainConfig, step: int, total: int) -> float:
    """lr at ``step`` of ``total``: constant, or cosine decay to 5% (a function of the step only, so resume-safe)."""
    lr = train.lr
    if train.lr_schedule == "cosine":
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return lr


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]  # frozen ones stay equal
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


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
    ledger: Ledger | None,
    stage: str,
    num_examples: int,
    generators: dict[str, torch.Generator],
    train: TrainConfig | None = None,
    noise_multiplicity: int | None = None,
) -> DPSGD | NonPrivateSGD:
    """DP-SGD with σ calibrated against the ledger, or (no ledger: a public stage; or
    ``privacy.enabled=false``) the same step without privacy, batched by ``train`` (default: the recipe's)."""
    r, t = recipe, train or recipe.train
    common = dict(
        num_examples=num_examples,
        batch_size=t.batch_size,
        noise_multiplicity=noise_multiplicity or r.privacy.noise_multiplicity,
        max_physical_batch_size=t.max_physical_batch_size,
        generator=generators["batches"],
        precision=t.precision,  # the forward's autocast dtype; clipping, noise and the ledger are the same in either
    )
    if ledger is None or not r.privacy.enabled:
        return NonPrivateSGD(model, optimizer, **common)
    return DPSGD(
        model,
        optimizer,
        noise_multiplier=noise_for(r, ledger, stage=stage, num_examples=num_examples),
        max_grad_norm=r.privacy.max_grad_norm,
        noise_generator=generators["dp_noise"],
        grad_sample_mode=r.privacy.grad_sample_mode,
        **common,
    )


def check_stage(
    *,
    stage: str,
    num_examples: int,
    train: TrainConfig,
    build: Callable[[], torch.nn.Module] | None = None,
    select: Callable[[torch.nn.Module], object] | None = None,
) -> torch.nn.Module | None:
    """Raise now what :func:`train_denoiser` would raise when stage ``stage`` starts: a batch larger than its
    data, a network the model constructor rejects (``build()``), trainable groups that match nothing
    (``select``). A method calls this for each of its stages before its run writes anything.

    The network is built on the meta device (no memory, no weights) with the global generator left as
    it was, so the real training draws exactly what it would have. Returns that (meta) network."""
    if train.batch_size > num_examples:
        raise ValueError(
            f"batch_size={train.batch_size} of stage {stage} is larger than its data set ({num_examples} examples)"
        )
    if build is None:
        return None
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        net = build()
        if select is not None:
            select(net)
    return net


@dataclass
class TrainResult:
    denoiser: Denoiser  # the EMA weights, in eval mode
    steps: int
    stopped_at_budget: bool


STATE_KEY = "state"  # train_denoiser's ``state`` in a checkpoint's ``extra``
OFFSET_KEY = (
    "ledger_offset"  # steps the ledger counts beyond the checkpoint's step index (re-taken steps), in ``extra``
)


def _global_rng(device: torch.device) -> dict[str, tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]]:
    """(get, set) of the global torch generators the stage's modules may draw from (dropout): CPU, and the device's."""
    out = {"torch_cpu": (torch.get_rng_state, torch.set_rng_state)}
    if device.type == "cuda":
        out["torch_cuda"] = (lambda: torch.cuda.get_rng_state(device), lambda s: torch.cuda.set_rng_state(s, device))
    return out


def fresh_draws(gens: dict[str, torch.Generator]) -> None:
    """Reseed the Poisson sampler's and the DP noise's generators from the OS's entropy.

    For steps whose output already left the process (a checkpoint that was written, then found
    damaged and set aside): replaying them with the same batch B_t and noise z_t would release a
    second output under the *same* noise, whose difference from the first is noise-free wherever
    the two computations differ (autotuned or non-deterministic kernels); with fresh draws each
    execution is an independent subsampled Gaussian mechanism, and both are counted. Under torchrun
    the sampler's state is broadcast from rank 0 when the engine is built, and rank 0 alone draws noise.
    """
    gens["batches"].manual_seed(secrets.randbits(63))
    gens["dp_noise"].manual_seed(secrets.randbits(63))


def _generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    # Separate streams: which examples are sampled, the DP noise, and the diffusion noise/labels.
    names = ("batches", "dp_noise", "diffusion")
    return {
        n: torch.Generator(device="cpu" if n == "batches" else device).manual_seed(seed * 1000 + i)
        for i, n in enumerate(names)
    }


Conditioner = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
"""``condition(idx, K, generator)``: the per-draw conditions of examples ``idx``, [B, K] or [B, K, L]."""


def label_conditioner(dataset: ImageDataset, recipe: Recipe, device: torch.device) -> Conditioner:
    """Class labels per draw, each replaced by the null label with p = ``diffusion.label_dropout`` (CFG)."""
    labels = dataset.labels.to(device)

    def condition(idx: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        y = labels[idx.to(device, non_blocking=True)]
        return drop_labels(
            y[:, None].expand(-1, K),
            p=recipe.diffusion.label_dropout,
            null_label=dataset.num_classes,
            generator=generator,
        )

    return condition


class ExtraTerm(Protocol):
    """An extra term of a stage's training objective that carries its own state (PrivateLoRA's
    :class:`~privdiff.methods.lora.PrivacyTerm`: its proxy attacker h_ω and h_ω's optimizer).

    ``objective(module, idx, loss)`` turns the per-example denoising loss [B] of examples ``idx`` into
    the per-example training objective [B]; ``after_step(step)`` runs after each optimizer step;
    ``state_dict()`` / ``load_state_dict()`` are saved in every checkpoint and loaded on resume, as
    the network is, so a resumed stage continues the term where the checkpoint left it.
    """

    def objective(self, module: torch.nn.Module, idx: torch.Tensor, loss: torch.Tensor) -> torch.Tensor: ...

    def after_step(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Stage:
    """What one call of :func:`train_denoiser` trains, and how.

    ``name`` is the stage's name in the ledger, the checkpoints and the train log; ``train`` its batch,
    epochs, lr and EMA (None: the recipe's ``train``); ``noise_multiplicity`` K (None:
    ``privacy.noise_multiplicity``; a public stage needs no variance reduction: 1); ``init()`` builds
    the network when no checkpoint exists (None: the recipe's pixel UNet); ``select(net)`` freezes
    what must not train (applied after a resume too); ``condition`` draws the per-draw conditions
    (None: labels with CFG dropout); ``sigmas`` is p_train(σ) (None: the recipe's; a pretrained
    discrete-time net keeps its own, :class:`~privdiff.diffusion.discrete.DiscreteSigma`).
    """

    name: str = "dp_sgd"
    train: TrainConfig | None = None
    noise_multiplicity: int | None = None
    init: Callable[[], torch.nn.Module] | None = None
    select: Callable[[torch.nn.Module], object] | None = None
    condition: Conditioner | None = None
    sigmas: SigmaDistribution | None = None


def train_denoiser(
    *,
    run: Run,
    recipe: Recipe,
    dataset: ImageDataset,
    ledger: Ledger | None,
    stage: Stage = Stage(),
    term: ExtraTerm | None = None,
    audit: "GradientCanaries | None" = None,
    progress: bool = True,
) -> TrainResult:
    """Train a conditional denoiser on ``dataset``: the one training loop of privdiff.

    Private when a ``ledger`` is given (and ``privacy.enabled``); ``ledger=None`` is a public
    stage, which records nothing. ``stage`` says what trains and how (:class:`Stage`); ``term`` adds
    an :class:`ExtraTerm` to the per-example objective (PrivateLoRA's privacy term); ``audit`` puts the
    canaries of an empirical privacy audit (:mod:`privdiff.privacy.audit`) into the private steps,
    around the engine. The global torch generator (dropout, e.g. an attacker's) is checkpointed too,
    so a stage stopped at step k and resumed takes the steps of an uninterrupted run of the same seed.
    Resumes from the run's latest checkpoint. Every step passes the stage's
    :class:`~privdiff.privacy.budget.StepGuard`: the ledger is written *before* the step touches the
    data, and a step that would take ε past ``privacy.epsilon`` is not taken.
    """
    r, t, device = recipe, stage.train or recipe.train, default_device()
    world = current_world()  # under torchrun: W processes share each step (privacy.dpsgd), rank 0 writes
    progress = progress and world.is_main
    torch.manual_seed(t.seed)
    gens = _generators(t.seed, device)
    N, K = len(dataset), stage.noise_multiplicity or r.privacy.noise_multiplicity
    if t.batch_size > N:
        raise ValueError(f"batch_size={t.batch_size} of stage {stage.name} is larger than its data set ({N} examples)")

    restore = run.resume_checkpoint(
        what=stage.name
    )  # the newest intact checkpoint (damaged ones are set aside, said on stderr)
    resume = restore is not None
    run.discard_orphans()
    if resume:
        saved = run.load_checkpoint(restore)
        net, net_ema, start = saved.unet, saved.unet_ema, saved.step
        _restore_rng(saved, gens, device)
        if term is not None:
            if STATE_KEY not in saved.extra:
                raise RunError(
                    f"{restore}: holds no state for stage {stage.name}'s {type(term).__name__} "
                    "(written before it was checkpointed); use a new --out"
                )
            term.load_state_dict(saved.extra[STATE_KEY])
    else:
        net = stage.init() if stage.init is not None else pixel_net(r, dataset)
        net_ema, start = copy.deepcopy(net), 0
    retake = run.set_aside_step > start  # steps after `start` whose output was written in a checkpoint now unusable
    if retake:
        fresh_draws(gens)
    if world.distributed:
        _join_world(
            world,
            gens,
            ledger,
            seed=t.seed,
            start=start,
            what=(stage.name, start, N, dataset.fingerprint, planned_steps(t, N)),
        )
    if stage.select is not None:
        stage.select(net)
    net.to(device).train()
    net_ema.to(device).eval().requires_grad_(False)
    denoiser, ema_denoiser = make_denoiser(r, net), make_denoiser(r, net_ema)
    if audit is not None:
        audit.install(denoiser)  # the canaries' coordinates: trained, clipped and noised like the rest
    optimizer = torch.optim.Adam([p for p in denoiser.parameters() if p.requires_grad], lr=t.lr)
    if resume:
        optimizer.load_state_dict(saved.optimizer)

    q = t.batch_size / N
    total = planned_steps(t, N)
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    engine = make_engine(
        r,
        denoiser,
        optimizer,
        ledger=ledger,
        stage=stage.name,
        num_examples=N,
        generators=gens,
        train=t,
        noise_multiplicity=K,
    )
    if audit is not None:
        engine = audit.wrap(engine, noise_multiplicity=K)  # batches gain the included canaries; the loss their terms
    guard = StepGuard(ledger, engine=engine, stage=stage.name, path=run.ledger_path, target_epsilon=r.privacy.epsilon)
    # Steps start..counted-1 were counted by an attempt that died before its next checkpoint. The
    # checkpoint restored the sampler's and the noise's generators, so they replay the *same* draws
    # (batch B_t, noise z_t): one execution of the mechanism, counted once (privacy.budget.replayed_steps).
    again = guard.resume(start=start, offset=int(saved.extra.get(OFFSET_KEY, 0)) if resume else 0, retake=retake)
    if again:
        tqdm.write(
            f"{stage.name}: steps {start + 1}..{run.set_aside_step} were written in a checkpoint that is now unusable, so "
            f"they are taken again with fresh batches and noise; the ledger keeps the {guard.offset} steps it counted "
            f"after step {start} and counts the new ones too",
            file=sys.stderr,
        )
    images = dataset.images.to(device)
    sigma_dist = stage.sigmas or training_sigma_distribution(r)
    condition = stage.condition or label_conditioner(dataset, r, device)

    def loss_fn(module: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        x0 = images[idx.to(device, non_blocking=True)]  # no stream sync per chunk on a GPU
        sigma_bk, noise = draw_training_noise(x0, K=K, sigma_dist=sigma_dist, generator=gens["diffusion"])
        c_bk = condition(idx, K, gens["diffusion"])
        loss = denoising_loss(module, x0, c_bk, sigma=sigma_bk, noise=noise, loss_weight=denoiser.loss_weight)
        return loss if term is None else term.objective(module, idx, loss)

    def checkpoint(step: int) -> None:
        rng = {n: g.get_state() for n, g in gens.items()} | {n: get() for n, (get, _) in _global_rng(device).items()}
        extra = ({} if term is None else {STATE_KEY: term.state_dict()}) | (
            {OFFSET_KEY: guard.offset} if guard.offset else {}
        )
        run.save_checkpoint(
            TrainingState(step=step, unet=net, unet_ema=net_ema, optimizer=optimizer.state_dict(), rng=rng, extra=extra)
        )

    if progress:
        _start_line(stage.name, net, N=N, q=q, total=total, K=K, engine=engine, data=dataset, start=start)
    bar = tqdm(
        total=total,
        initial=start,
        desc=stage.name,
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    step, stopped = start, False
    run.commit_start()  # the run's work begins: from here on a failure keeps what is on disk, to resume
    clock = run.rewind_train_log(stage=stage.name, step=start) - time.perf_counter()
    for step in range(start, total):
        if not guard.allows(step):
            stopped = True
            tqdm.write(
                f"stopping at step {step}: one more step would exceed epsilon={r.privacy.epsilon}", file=sys.stderr
            )
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(t, step, planned_steps(t, N))
        indices = engine.batches.next()
        guard.record(step)  # write-ahead: counted before the data is touched
        loss = engine.step(indices, loss_fn)
        guard.verify(step, noised_steps=getattr(engine, "noised_steps", 0))
        if term is not None:
            term.after_step(step)
        _ema_update(net_ema, net, min(t.ema_decay, (1 + step) / (10 + step)))
        eps = guard.epsilon()
        run.append_train_log(
            {
                "stage": stage.name,
                "step": step + 1,
                "loss": loss,
                "epsilon": eps,
                "lr": optimizer.param_groups[0]["lr"],
                "time_s": round(clock + time.perf_counter(), 3),
            }
        )
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss:.4f}",
            **({} if ledger is None else {"eps": f"{eps:.3f}" if eps is not None else "inf"}),
            refresh=False,
        )
        if (step + 1) % t.checkpoint_every == 0 and step + 1 < total:
            checkpoint(step + 1)
    else:
        step = total
    bar.close()
    if step > start or not resume:
        checkpoint(step)
    if ledger is not None:
        ledger.save(run.ledger_path)
    barrier()  # nobody moves on before rank 0 has written the stage's last checkpoint and ledger
    return TrainResult(denoiser=ema_denoiser, steps=step, stopped_at_budget=stopped)


def _restore_rng(saved: TrainingState, gens: dict[str, torch.Generator], device: torch.device) -> None:
    """Set the stage's generators and the global ones (dropout) to a checkpoint's."""
    for name, g in gens.items():
        g.set_state(saved.rng[name].to(torch.uint8))
    for name, (_, set_rng) in _global_rng(device).items():
        if name in saved.rng:  # absent from checkpoints written before it was saved
            set_rng(saved.rng[name].to(torch.uint8))


def _start_line(
    name: str, net: torch.nn.Module, *, N: int, q: float, total: int, K: int, engine, data: ImageDataset, start: int = 0
) -> None:
    """The stage's one line on stderr, at every start and every resume: the data as it trains (resolution,
    channels, N, classes: what the data decided, or data.resolution), what trains, q, the planned steps, K,
    the noise σ and C, and the step it resumes from, so a run never trains on something it did not say."""
    trainable, all_params = count_parameters(net), sum(p.numel() for p in net.parameters())
    share = (
        f"{trainable:,} parameters"
        if trainable == all_params
        else f"{trainable:,} of {all_params:,} parameters trainable ({trainable / all_params:.1%})"
    )
    channels = f"{data.channels} channel{'s' * (data.channels != 1)}"
    where = f"resumes from step {start} of {total}" if start else "starts at step 0"
    tqdm.write(
        f"{name}: {data.resolution}x{data.resolution}, {channels}, N={N}, {data.num_classes} classes; {share}, "
        f"q={q:.4f}, {total} planned steps, K={K}, "
        + (f"sigma={engine.noise_multiplier:.4f}, C={engine.max_grad_norm}" if engine.private else "non-private")
        + f"; {where}",
        file=sys.stderr,
    )


def _join_world(
    world, gens: dict[str, torch.Generator], ledger: Ledger | None, *, seed: int, start: int, what: tuple
) -> None:
    """Make a distributed stage start from one state: every rank at the same step of the same stage
    (checked), rank 0's ledger in memory everywhere (a rank that read the file a moment later
    could count a step more), and rank-specific diffusion noise (rank 0 continues the checkpointed
    stream; the others draw from (seed, rank, start)). The batch generator is made rank 0's by
    the engine (:class:`~privdiff.privacy.dpsgd.PoissonBatches`)."""
    agree(what, what="the stage, start step, data and planned steps (is the run directory on storage every node sees?)")
    if ledger is not None:
        ledger.events, ledger.public_stages = broadcast_object((ledger.events, ledger.public_stages))
    if world.rank > 0:
        gens["diffusion"].manual_seed(int(np.random.SeedSequence([seed, world.rank, start]).generate_state(1)[0]))
