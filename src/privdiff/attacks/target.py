"""What an attack queries: a run's denoiser as an ε-predictor, in the space it was trained in.

PIA's ``EpsGetter`` idea: every attack only needs ε̂_θ(x, σ, c). privdiff's denoisers are
EDM-preconditioned D(x; σ, c) on x = x₀ + σ·n (pixels, or DP-LDM latents), so

    ε̂(x, σ, c) = (x − D(x; σ, c)) / σ,

which is the DDPM ε-prediction in the scaled variable x = x_t/√ᾱ_t with σ = √(1/ᾱ_t − 1).
A DP-LDM run is attacked in its latent space: images are encoded by the run's autoencoder; a run on a
Stable-Diffusion-style pipeline by the pipeline's frozen VAE (z = s·μ(x), as it trained), each example
conditioned on its own caption. A pretrained net's timesteps are its own (:attr:`Target.sigmas`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import Recipe
from ..data import ImageDataset
from ..data.membership import MembershipSplits, split_held_out
from ..diffusion import Denoiser
from ..diffusion.discrete import DiscreteSigma, VPDenoiser, timestep_sigmas
from ..core.denoisers import default_device, load_denoiser
from ..core.pipelines import pipeline_encoder
from ..core.stages import recipe_dataset, require_test_split
from ..core.training import training_sigma_distribution
from ..models.pretrained import is_text_pipeline
from ..privacy.budget import load_ledger
from ..runs import Run

__all__ = ["Target", "load_target", "run_splits", "role_datasets", "SPLITS_FILE"]

SPLITS_FILE = "splits.json"


@dataclass
class Target:
    """A trained denoiser as an ε-predictor, plus how to bring images into its space."""

    denoiser: Denoiser
    recipe: Recipe
    encode: Callable[[Tensor], Tensor] | None = None  # images in [-1, 1] -> latents (DP-LDM); None: pixel space
    batch_size: int = 250

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def sigmas(self) -> Tensor:
        """σ_t, t = 0..T−1, of the timesteps the attacks are defined on (:func:`~privdiff.diffusion.discrete.timestep_sigmas`)."""
        if not hasattr(self, "_sigmas"):
            self._sigmas = timestep_sigmas(self.denoiser)
        return self._sigmas

    def sigma(self, t: int) -> float:
        """σ_t of timestep ``t``."""
        if not 0 <= t < len(self.sigmas):
            raise ValueError(f"timestep t must be in [0, {len(self.sigmas)}), got {t}")
        return float(self.sigmas[t])

    def eps(self, x: Tensor, sigma: float | Tensor, cond: Tensor | None) -> Tensor:
        """ε̂(x, σ, c) = (x − D(x; σ, c)) / σ."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        D = self.denoiser(x, sigma, cond)
        return (x - D) / sigma.view(-1, *([1] * (x.ndim - 1)))

    @torch.no_grad()
    def inputs(self, dataset: ImageDataset) -> tuple[Tensor, Tensor | None]:
        """(x₀ in model space [N, ...], conditions [N], [N, 1 + L] or caption token ids [N, L]) of ``dataset`` on the
        target's device: a text-conditioned net reads each example's own caption."""
        x = dataset.images.to(self.device)
        if self.encode is not None:
            x = torch.cat([self.encode(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
        prompts = None if dataset.captions is None else list(dataset.captions)
        cond = self.denoiser.net.conditions(labels=dataset.labels, prompts=prompts, n=len(dataset))
        return x, None if cond is None else cond.to(self.device)

    def sigma_distribution(self):
        """The run's training noise-level distribution p(σ): a pretrained net's σ_t with t ~ U{0..T−1}, else the
        recipe's (the analogue of DDPM's)."""
        if isinstance(self.denoiser, VPDenoiser):
            return DiscreteSigma(self.denoiser.schedule)
        return training_sigma_distribution(self.recipe)


def load_target(run: Run) -> Target:
    """The run's EMA denoiser as a :class:`Target` (with its autoencoder's encoder for a DP-LDM run, the pipeline's
    VAE encoder for a run on a text-to-image pipeline)."""
    recipe = run.load_config()
    denoiser = load_denoiser(run, recipe).requires_grad_(False)
    encode = None
    if is_text_pipeline(recipe.model.pretrained):
        encode = pipeline_encoder(recipe.model.pretrained, device=default_device())
    elif (run.path / "autoencoder").is_dir():
        from diffusers import AutoencoderKL

        from ..models.autoencoder import encode_latents

        ae = (
            AutoencoderKL.from_pretrained(
                run.path / "autoencoder", local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
            )
            .to(default_device())
            .eval()
            .requires_grad_(False)
        )
        encode = lambda x: encode_latents(ae, x)  # noqa: E731  s·μ(x), as the run's training latents
    return Target(denoiser=denoiser, recipe=recipe, encode=encode)


def run_splits(run: Run, *, n_per_role: int | None = None, seed: int | None = None) -> MembershipSplits:
    """The run's membership splits: ``RUN/splits.json`` if training recorded it (a LoRA run), else
    drawn once and recorded: members = the recipe's training split, which a DPDM / DP-LDM / DPP run
    trains on in full (checked against the ledger's fingerprint), non-members = its held-out test split.
    """
    path = run.path / SPLITS_FILE
    if path.is_file():
        return MembershipSplits.load(path)
    recipe = run.load_config()
    require_test_split(recipe)  # before anything is read: the non-members are the data's test split
    d = recipe.data
    members = recipe_dataset(recipe, split="train")
    load_ledger(run, members)  # a ledger that names other private data is an error: members must be what was trained on
    nonmembers = recipe_dataset(recipe, split="test")
    splits = split_held_out(
        members=members,
        nonmembers=nonmembers,
        seed=recipe.train.seed if seed is None else seed,
        n_per_role=n_per_role,
        root=d.root,
        resolution=d.resolution,
    )
    splits.save(path)
    return splits


def role_datasets(
    splits: MembershipSplits, *, unused_nonmembers: int = 0, recipe: Recipe | None = None
) -> dict[str, ImageDataset]:
    """Each role's examples, read from the data set and split the role names (through the run's ``recipe`` when
    given: :func:`~privdiff.core.stages.recipe_dataset`, which also reads captioned data; checked by fingerprint);
    with ``unused_nonmembers`` = n > 0 also ``"nonmember_unused"``: up to n of the non-member split's examples in no
    role (:meth:`MembershipSplits.unused_nonmembers`)."""
    sources: dict[str, ImageDataset] = {}
    out = {}
    for role, r in splits.roles.items():
        if r["split"] not in sources:
            sources[r["split"]] = (
                splits.source(r["split"]) if recipe is None else recipe_dataset(recipe, split=r["split"])
            )
        out[role] = splits.dataset(role, sources[r["split"]])
    if unused_nonmembers:
        out["nonmember_unused"] = splits.unused_nonmembers(
            sources[splits.roles["nonmember_test"]["split"]], limit=unused_nonmembers
        )
    return out
