"""Stages every method composes: train a denoiser (private or not) and sample from it.

There is one training loop in privdiff, :func:`train_denoiser`. A method is a short recipe
that calls it (and other stages) with its data and its trainable parameters.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from ..config import Recipe, TrainConfig
from ..data import ImageDataset
from ..distributed import agree, barrier, broadcast_object, current_world
from ..diffusion import Denoiser, denoising_loss, draw_training_noise, drop_labels, guided_denoiser, make_sigma_distribution, sample
from ..models import UNetNet, build_unet, count_parameters
from ..privacy.dpsgd import DPSGD, NonPrivateSGD
from ..privacy.ledger import NON_PRIVATE, SUBSAMPLED_GAUSSIAN, Ledger
from ..runs import Run, RunError, TrainingState
from .budget import data_identity, noise_for, planned_steps, replayed_steps

if TYPE_CHECKING:
    from ..privacy.audit import GradientCanaries


def default_device() -> torch.device:
    """CUDA when present, else CPU: privdiff never requires a GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_denoiser(recipe: Recipe, net: torch.nn.Module) -> Denoiser:
    """Wrap a network (a ``UNet2DModel``, or a ``net(x, c_noise, cond)`` module) in the recipe's preconditioning (EDM or v)."""
    if isinstance(net, UNet2DModel):
        net = UNetNet(net)
    return Denoiser(net, sigma_data=recipe.diffusion.sigma_data, parameterization=recipe.diffusion.parameterization)


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
        num_examples=num_examples, batch_size=t.batch_size, noise_multiplicity=noise_multiplicity or r.privacy.noise_multiplicity,
        max_physical_batch_size=t.max_physical_batch_size, generator=generators["batches"],
    )
    if ledger is None or not r.privacy.enabled:
        return NonPrivateSGD(model, optimizer, **common)
    return DPSGD(
        model, optimizer, noise_multiplier=noise_for(r, ledger, stage=stage, num_examples=num_examples),
        max_grad_norm=r.privacy.max_grad_norm, noise_generator=generators["dp_noise"],
        grad_sample_mode=r.privacy.grad_sample_mode, **common,
    )


def pixel_net(recipe: Recipe, dataset: ImageDataset) -> UNetNet:
    """A fresh pixel-space denoiser network for ``dataset`` from ``recipe.model`` (DPDM's, DPP's, LoRA's base)."""
    return UNetNet(build_unet(recipe.model, resolution=dataset.resolution, in_channels=dataset.channels,
                              num_classes=dataset.num_classes))


def check_stage(*, stage: str, num_examples: int, train: TrainConfig, build: Callable[[], torch.nn.Module] | None = None,
                select: Callable[[torch.nn.Module], object] | None = None) -> torch.nn.Module | None:
    """Raise now what :func:`train_denoiser` would raise when stage ``stage`` starts: a batch larger than its
    data, a network the model constructor rejects (``build()``), trainable groups that match nothing
    (``select``). A method calls this for each of its stages before its run writes anything.

    The network is built on the meta device (no memory, no weights) with the global generator left as
    it was, so the real training draws exactly what it would have. Returns that (meta) network."""
    if train.batch_size > num_examples:
        raise ValueError(f"batch_size={train.batch_size} of stage {stage} is larger than its data set ({num_examples} examples)")
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
OFFSET_KEY = "ledger_offset"  # steps the ledger counts beyond the checkpoint's step index (re-taken steps), in ``extra``


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
    import secrets

    gens["batches"].manual_seed(secrets.randbits(63))
    gens["dp_noise"].manual_seed(secrets.randbits(63))


def _generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    # Separate streams: which examples are sampled, the DP noise, and the diffusion noise/labels.
    names = ("batches", "dp_noise", "diffusion")
    return {n: torch.Generator(device="cpu" if n == "batches" else device).manual_seed(seed * 1000 + i) for i, n in enumerate(names)}


class Stateful(Protocol):
    """Training state a stage carries beside its network (``train_denoiser(state=...)``), checkpointed with it."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Conditioner = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
"""``condition(idx, K, generator)``: the per-draw conditions of examples ``idx``, [B, K] or [B, K, L]."""


def label_conditioner(dataset: ImageDataset, recipe: Recipe, device: torch.device) -> Conditioner:
    """Class labels per draw, each replaced by the null label with p = ``diffusion.label_dropout`` (CFG)."""
    labels = dataset.labels.to(device)

    def condition(idx: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        y = labels[idx.to(device)]
        return drop_labels(y[:, None].expand(-1, K), p=recipe.diffusion.label_dropout, null_label=dataset.num_classes, generator=generator)
    return condition


def train_denoiser(
    *,
    run: Run,
    recipe: Recipe,
    dataset: ImageDataset,
    ledger: Ledger | None,
    stage: str = "dp_sgd",
    train: TrainConfig | None = None,
    init: Callable[[], torch.nn.Module] | None = None,
    select: Callable[[torch.nn.Module], object] | None = None,
    condition: Conditioner | None = None,
    noise_multiplicity: int | None = None,
    progress: bool = True,
    audit: "GradientCanaries | None" = None,
    objective: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    state: Stateful | None = None,
) -> TrainResult:
    """Train a conditional denoiser on ``dataset``: the one training loop of privdiff.

    Private when a ``ledger`` is given (and ``privacy.enabled``); ``ledger=None`` is a public
    stage, which records nothing. ``train`` sets batch, epochs, lr and EMA (default: the
    recipe's ``train``); ``init()`` builds the network when no checkpoint exists (default: the
    recipe's pixel UNet); ``select(net)`` freezes what must not train (applied after a resume
    too); ``condition`` draws the per-draw conditions (default: labels with CFG dropout);
    ``noise_multiplicity`` K defaults to ``privacy.noise_multiplicity``; ``audit`` inserts the
    canaries of an empirical privacy audit (:mod:`privdiff.privacy.audit`) into the private steps.
    ``objective(module, idx, loss)`` turns the per-example denoising loss of examples ``idx`` into
    the per-example training objective (default: the loss itself; PrivateLoRA adds its privacy
    term); ``after_step(step)`` runs after each optimizer step (PrivateLoRA's attacker step);
    ``state`` is what those two carry between steps (PrivateLoRA's attacker, its Adam and its
    generator): saved in every checkpoint and loaded on resume, as the network is. The global
    torch generator (dropout, e.g. the attacker's) is checkpointed too, so a stage stopped at
    step k and resumed takes the steps of an uninterrupted run of the same seed.
    Resumes from the run's latest checkpoint. The ledger is written *before* each step touches
    the data, and a step that would take ε past ``privacy.epsilon`` is not taken.
    """
    r, t, device = recipe, train or recipe.train, default_device()
    world = current_world()  # under torchrun: W processes share each step (privacy.dpsgd), rank 0 writes
    progress = progress and world.is_main
    torch.manual_seed(t.seed)
    gens = _generators(t.seed, device)
    N, K = len(dataset), noise_multiplicity or r.privacy.noise_multiplicity
    if t.batch_size > N:
        raise ValueError(f"batch_size={t.batch_size} of stage {stage} is larger than its data set ({N} examples)")

    restore = run.resume_checkpoint(what=stage)  # the newest intact checkpoint (damaged ones are set aside, said on stderr)
    resume = restore is not None
    run.discard_orphans()
    if resume:
        saved = run.load_checkpoint(restore)
        net, net_ema, start = saved.unet, saved.unet_ema, saved.step
        for name, g in gens.items():
            g.set_state(saved.rng[name].to(torch.uint8))
        for name, (_, set_rng) in _global_rng(device).items():
            if name in saved.rng:  # absent from checkpoints written before it was saved
                set_rng(saved.rng[name].to(torch.uint8))
        if state is not None:
            if STATE_KEY not in saved.extra:
                raise RunError(f"{restore}: holds no state for stage {stage}'s {type(state).__name__} "
                               "(written before it was checkpointed); use a new --out")
            state.load_state_dict(saved.extra[STATE_KEY])
    else:
        net = init() if init is not None else pixel_net(r, dataset)
        net_ema, start = copy.deepcopy(net), 0
    # the ledger's count runs ahead of the step index by the steps re-taken earlier (saved in every checkpoint)
    offset = int(saved.extra.get(OFFSET_KEY, 0)) if resume else 0
    retake = run.set_aside_step > start  # steps after `start` whose output was written in a checkpoint now unusable
    if retake:
        fresh_draws(gens)
    if world.distributed:
        _join_world(world, gens, ledger, seed=t.seed, start=start, what=(stage, start, N, dataset.fingerprint, planned_steps(t, N)))
    if select is not None:
        select(net)
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
    engine = make_engine(r, denoiser, optimizer, ledger=ledger, stage=stage, num_examples=N, generators=gens, train=t,
                         noise_multiplicity=K)
    if audit is not None:
        audit.attach(engine)
    mech = dict(
        stage=stage,
        mechanism=SUBSAMPLED_GAUSSIAN if engine.private else NON_PRIVATE,
        noise_multiplier=engine.noise_multiplier,  # what the optimizer will actually draw
        sample_rate=engine.sample_rate,  # what the sampler actually uses
        max_grad_norm=engine.max_grad_norm,  # what the optimizer actually clips to
    )
    images = dataset.images.to(device)
    sigma_dist = training_sigma_distribution(r)
    condition = condition or label_conditioner(dataset, r, device)

    def loss_fn(module: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        x0 = images[idx.to(device)]
        sigma_bk, noise = draw_training_noise(x0, K=K, sigma_dist=sigma_dist, generator=gens["diffusion"])
        c_bk = condition(idx, K, gens["diffusion"])
        loss = denoising_loss(module, x0, c_bk, sigma=sigma_bk, noise=noise, loss_weight=denoiser.loss_weight)
        return loss if objective is None else objective(module, idx, loss)

    if audit is not None:
        loss_fn = audit.wrap_loss(loss_fn, K=K)

    def checkpoint(step: int) -> None:
        rng = {n: g.get_state() for n, g in gens.items()} | {n: get() for n, (get, _) in _global_rng(device).items()}
        extra = ({} if state is None else {STATE_KEY: state.state_dict()}) | ({OFFSET_KEY: recounted} if recounted else {})
        run.save_checkpoint(TrainingState(step=step, unet=net, unet_ema=net_ema, optimizer=optimizer.state_dict(), rng=rng,
                                          extra=extra))

    if start == 0 and progress:
        trainable, all_params = count_parameters(net), sum(p.numel() for p in net.parameters())
        share = f"{trainable:,} parameters" if trainable == all_params else f"{trainable:,} of {all_params:,} parameters trainable ({trainable / all_params:.1%})"
        tqdm.write(
            f"{stage}: {share}, N={N}, q={q:.4f}, {total} steps, K={K}, "
            + (f"sigma={engine.noise_multiplier:.4f}, C={engine.max_grad_norm}" if engine.private else "non-private"),
            file=sys.stderr,
        )
    bar = tqdm(total=total, initial=start, desc=stage, unit="step", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    step, stopped = start, False
    # Steps start..counted-1 were counted by an attempt that died before its next checkpoint. The
    # checkpoint restored the sampler's and the noise's generators, so they replay the *same* draws
    # (batch B_t, noise z_t): one execution of the mechanism, counted once (see replayed_steps).
    counted = replayed_steps(ledger, stage=stage, start=start, mech=mech, offset=offset)
    recounted = offset  # steps the ledger counts beyond the step index: taken again with fresh draws (not replays)
    if retake and ledger is not None:
        recounted, counted = offset + counted - start, start
        tqdm.write(f"{stage}: steps {start + 1}..{run.set_aside_step} were written in a checkpoint that is now unusable, so "
                   f"they are taken again with fresh batches and noise; the ledger keeps the {recounted} steps it counted "
                   "after step {start} and counts the new ones too".replace("{start}", str(start)), file=sys.stderr)
    run.commit_start()  # the run's work begins: from here on a failure keeps what is on disk, to resume
    clock = run.rewind_train_log(stage=stage, step=start) - time.perf_counter()
    for step in range(start, total):
        if step >= counted and engine.private and ledger.epsilon(extra=[(engine.noise_multiplier, engine.sample_rate, 1)]) > r.privacy.epsilon * (1 + 1e-9):
            stopped = True
            tqdm.write(f"stopping at step {step}: one more step would exceed epsilon={r.privacy.epsilon}", file=sys.stderr)
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(t, step, planned_steps(t, N))
        indices = engine.batches.next()
        if audit is not None:
            indices = audit.extend(indices)  # the included canaries, Poisson-sampled at the same q
        if ledger is not None and step >= counted:
            ledger.record(**mech)  # write-ahead: counted before the data is touched
            ledger.save(run.ledger_path)
            counted = step + 1
        loss = engine.step(indices, loss_fn)
        if engine.private and (start + engine.noised_steps != step + 1 or ledger.steps(stage) != counted + recounted):
            raise RuntimeError("internal error: noised steps and ledger disagree")  # never report an unbacked epsilon
        if after_step is not None:
            after_step(step)
        decay = min(t.ema_decay, (1 + step) / (10 + step))
        _ema_update(net_ema, net, decay)
        eps = ledger.epsilon() if engine.private else None
        run.append_train_log({"stage": stage, "step": step + 1, "loss": loss, "epsilon": eps,
                              "lr": optimizer.param_groups[0]["lr"], "time_s": round(clock + time.perf_counter(), 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", **({} if ledger is None else {"eps": f"{eps:.3f}" if engine.private else "inf"}), refresh=False)
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


def _join_world(world, gens: dict[str, torch.Generator], ledger: Ledger | None, *, seed: int, start: int, what: tuple) -> None:
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


def load_denoiser(run: Run, recipe: Recipe | None = None) -> Denoiser:
    """The EMA denoiser of a run's latest checkpoint, on the default device, in eval mode."""
    recipe = recipe or run.load_config()
    net = run.load_net(ema=True).to(default_device()).eval()
    return make_denoiser(recipe, net)


def load_decoder(run: Run) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents → images in [-1, 1] for a latent-diffusion run (its autoencoder), None for a pixel-space one."""
    path = run.path / "autoencoder"
    if not path.is_dir():
        return None
    from diffusers import AutoencoderKL

    ae = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
    ae = ae.to(default_device()).eval().requires_grad_(False)
    return lambda z: ae.decode(z / ae.config.scaling_factor).sample


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    *,
    labels: torch.Tensor | None,
    n: int,
    recipe: Recipe,
    prompts: list[str] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 250,
    progress: bool = True,
) -> np.ndarray:
    """Draw ``n`` images with the recipe's sampler, conditioned on ``labels`` [n] and/or ``prompts``
    (one for all, or n; text needs a DP-LDM run); latents are decoded with ``decode``.
    Returns float32 [n, C, H, W] in [0, 1]."""
    s = recipe.sampler
    net = denoiser.net
    device = next(denoiser.parameters()).device
    cond = net.conditions(labels=labels, prompts=prompts, n=n)
    null = net.null_condition()
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in tqdm(range(0, n, batch_size), desc="sampling", unit="batch", disable=not progress, file=sys.stderr):
        c = None if cond is None else cond[start:start + batch_size].to(device)
        b = min(batch_size, n - start)
        fn = guided_denoiser(denoiser, c, guidance=s.guidance if c is not None else 0.0, null_label=null)
        x = sample(
            fn, shape=(b, *net.sample_shape), sampler=s.name, steps=steps or s.steps, sigma_min=s.sigma_min,
            sigma_max=s.sigma_max, rho=s.rho, generator=g, device=device,
            **({"S_churn": s.S_churn, "S_min": s.S_min, "S_max": s.S_max, "S_noise": s.S_noise} if s.name in ("heun", "edm") else {}),
        )
        if decode is not None:
            x = decode(x)
        out.append(((x.clamp(-1, 1) + 1) / 2).float().cpu().numpy())
    return np.concatenate(out)


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels for a grid with one row per class: [0]*per_class + [1]*per_class + ..."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def train_autoencoder(*, run: Run, recipe: Recipe, public: ImageDataset, ledger: Ledger, progress: bool = True):
    """Train DP-LDM's ``AutoencoderKL`` on ``public`` data (non-private), or load it from ``RUN/autoencoder``.

    Adam on the per-example loss of :func:`~privdiff.models.autoencoder.autoencoder_loss` over
    uniformly drawn public batches; then the latent scaling factor s = 1/std(μ(x)) over the
    public images (Rombach et al. 2022), so latents have unit variance. The directory is written
    atomically when the stage is complete; the ledger notes the stage and its public data.
    """
    from diffusers import AutoencoderKL

    from ..atomic import atomic_directory
    from ..models.autoencoder import autoencoder_loss, build_autoencoder, encode_latents

    path, cfg, device = run.path / "autoencoder", recipe.ldm.autoencoder, default_device()
    if (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False).to(device).eval()
    torch.manual_seed(recipe.train.seed)
    g = torch.Generator(device=device).manual_seed(recipe.train.seed * 1000 + 7)
    ae = build_autoencoder(cfg, in_channels=public.channels, resolution=public.resolution).to(device).train()
    run.commit_start()  # the run's work begins
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr)
    images, N = public.images.to(device), len(public)
    steps = max(1, round(cfg.epochs * N / cfg.batch_size))
    clock = run.rewind_train_log(stage="autoencoder", step=0) - time.perf_counter()
    bar = tqdm(range(steps), desc="autoencoder", unit="step", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        idx = torch.randint(0, N, (min(cfg.batch_size, N),), generator=g, device=device)
        loss = autoencoder_loss(ae, images[idx], kl_weight=cfg.kl_weight, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        run.append_train_log({"stage": "autoencoder", "step": step + 1, "loss": loss.item(), "epsilon": None,
                              "lr": cfg.lr, "time_s": round(clock + time.perf_counter(), 3)})
    ae.eval()
    z = encode_latents(ae, images)
    ae.register_to_config(scaling_factor=float(1.0 / z.std()))  # s: unit-variance latents
    with atomic_directory(path) as tmp:
        ae.save_pretrained(tmp, safe_serialization=True)
    ledger.record_public(stage="autoencoder", data=data_identity(public), steps=steps)
    ledger.save(run.ledger_path)
    return ae
