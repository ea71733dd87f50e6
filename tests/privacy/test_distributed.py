"""DP-SGD on a torch.distributed world (2 CPU processes, gloo) is the one-process mechanism.

One spawn of two workers runs every case; the main process computes the one-process reference
with the same model, examples and seeds. Checked: the clipped-gradient sum of the world equals the
one-process sum over the same examples (book-keeping and Opacus' hooks, noise multiplicity,
virtual batches with a different number of chunks per rank, a rank with no example); the noise
in the applied update has std σC/(qN) — noise drawn on every rank would give √2 times that — and
is the very noise a single process draws with the same seed; the replicas stay identical.
"""

from __future__ import annotations

import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist

from privdiff.distributed import World, current_world
from privdiff.privacy.dpsgd import PoissonBatches

from privdiff.diffusion import Denoiser, denoising_loss
from privdiff.models.unet import UNetConfig, UNetNet, build_unet

from .test_dpsgd import RES, MnistLike, engine_for, flat

W = 2
N, B, SIGMA, C = 12, 5, 1.3, 2e-2
CASES = {  # name: (grad_sample_mode, K, max_physical_batch_size rows, global batch)
    "bk": ("bk", 1, 512, [0, 2, 3, 5, 8, 9, 11]),
    "bk-K2-virtual": ("bk", 2, 4, [0, 1, 2, 4, 6, 7, 9, 10, 11]),  # rank 0: 5 examples in 3 chunks, rank 1: 4 in 2
    "hooks-K2": ("hooks", 2, 512, [1, 3, 4, 6, 10]),
    "one-example": ("bk", 1, 512, [7]),  # rank 1 has nothing to compute, still takes part in the step
}


SMALL = UNetConfig(channels=(8, 16), layers_per_block=1, attention_levels=(1,), norm_num_groups=4, attention_head_dim=4)


def build_denoiser(seed: int = 0) -> Denoiser:
    """A small attention UNet (~45k parameters: enough coordinates for a sharp std estimate)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Denoiser(UNetNet(build_unet(SMALL, resolution=RES, in_channels=1, num_classes=10)))


class Fixed(MnistLike):
    """MnistLike's fixed examples and draws, with the loss weight passed explicitly (DDP hides it)."""

    def __init__(self, K: int):
        super().__init__(n=N, K=K, seed=3)
        self.weight = build_denoiser(0).loss_weight

    def loss_fn(self, module, idx):
        return denoising_loss(
            module, self.x[idx], self.labels[idx], sigma=self.sigma[idx], noise=self.noise[idx], loss_weight=self.weight
        )


def applied_update(
    *, mode: str, K: int, max_physical: int, idx: list[int], sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(update the optimizer applied, parameters after the step) of one DPSGD step on the global batch ``idx``."""
    den = build_denoiser(0)
    engine = engine_for(
        den, n=N, batch_size=B, sigma=sigma, C=C, K=K, max_physical=max_physical, noise_seed=5, mode=mode
    )
    engine.step(torch.tensor(idx), Fixed(K).loss_fn)
    assert engine.noised_steps == 1
    return flat(engine.optimizer.original_optimizer.seen), flat(p.detach() for p in den.parameters())


@functools.lru_cache(maxsize=None)
def one_process(case: str, sigma: float) -> torch.Tensor:
    """The update one process applies in ``case`` (one chunk), the reference."""
    mode, K, _, idx = CASES[case]
    return applied_update(mode=mode, K=K, max_physical=512, idx=idx, sigma=sigma)[0]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        assert current_world() == World(rank=rank, size=W)
        results = {}
        for name, (mode, K, max_physical, idx) in CASES.items():
            for sigma in (0.0, SIGMA):
                update, params = applied_update(mode=mode, K=K, max_physical=max_physical, idx=idx, sigma=sigma)
                replicas = [torch.empty_like(params) for _ in range(W)]
                dist.all_gather(replicas, params)
                results[name, sigma] = update, max(float((r - replicas[0]).abs().max()) for r in replicas)
        # the global batches: the same on every rank, and what one process draws with the same generator state
        g = torch.Generator().manual_seed(1234 + 99 * rank)  # different on purpose: rank 0's state must win
        batches = PoissonBatches(num_examples=1000, sample_rate=0.05, generator=g)
        drawn = [batches.next() for _ in range(3)]
        results["batches"] = drawn, [batches.shard(b) for b in drawn]
        if rank == 0:
            torch.save(results, out)
        else:
            torch.save(results["batches"], out + ".rank1")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist") / "results.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, out), nprocs=W, join=True)
    return torch.load(out, weights_only=False), torch.load(out + ".rank1", weights_only=False)


@pytest.mark.parametrize("case", list(CASES))
def test_clipped_sum_of_the_world_is_the_one_process_sum(world_results, case):
    results, _ = world_results
    got, spread = results[case, 0.0]
    want = one_process(case, 0.0)
    assert float(want.abs().max()) > 0
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert spread == 0.0  # every replica applied the same update


@pytest.mark.parametrize("case", list(CASES))
def test_noise_is_added_once_for_the_world(world_results, case):
    results, _ = world_results
    noise = results[case, SIGMA][0] - results[case, 0.0][0]  # same model, batch and clipped sum: ξ/(qN)
    std = SIGMA * C / B
    assert noise.numel() > 40_000
    # the sample std of >40k N(0, std²) draws is within 0.4% of std (1 s.e.); per-rank noise would give √2·std
    assert float(noise.std()) == pytest.approx(std, rel=0.03)
    assert abs(float(noise.mean())) < 5 * std / noise.numel() ** 0.5
    # and it is the very noise one process draws with the same noise seed
    one = one_process(case, SIGMA) - one_process(case, 0.0)
    assert float((noise - one).abs().max()) <= 1e-3 * std
    assert results[case, SIGMA][1] == 0.0


def test_global_batches_are_rank_zeros_poisson_draws_and_shards_partition_them(world_results):
    (drawn0, shards0), (drawn1, shards1) = world_results[0]["batches"], world_results[1]
    one = PoissonBatches(num_examples=1000, sample_rate=0.05, generator=torch.Generator().manual_seed(1234))
    for b0, b1, s0, s1 in zip(drawn0, drawn1, shards0, shards1):
        assert torch.equal(b0, b1) and torch.equal(b0, one.next())  # the same global batch as one process
        assert len(b0) > 10
        assert sorted(torch.cat([s0, s1]).tolist()) == b0.tolist()  # disjoint shards whose union is the batch
        assert abs(len(s0) - len(s1)) <= 1
