"""torch.distributed for privdiff: which process this is, and the few collectives training needs.

privdiff runs under ``torchrun`` SPMD-style: every process runs the same command on the same
recipe; the private training loop splits each step's batch among them (see
:mod:`privdiff.privacy.dpsgd`), and **rank 0 alone writes files** (config, ledger, checkpoints,
train log, samples): :mod:`privdiff.atomic` and :class:`privdiff.runs.Run` do nothing on other ranks.

Without a process group (a plain ``privdiff train``) everything here is a no-op for a world of
one. ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous;
:func:`init_from_env` joins it with gloo on CPU or NCCL on GPUs (one GPU per process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the world: ``rank`` of ``size`` processes (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The world of the initialised default process group, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    """True on rank 0 (and when not distributed): the one process that writes files."""
    return current_world().is_main


def launched_by_torchrun() -> bool:
    """True in a worker started by ``torchrun`` / ``torch.distributed.run`` (it sets these variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def init_from_env() -> World:
    """Join the process group torchrun describes in the environment (no-op otherwise, or if already joined).

    Backend: NCCL when CUDA is present (each process on GPU ``LOCAL_RANK``), else gloo.
    """
    if launched_by_torchrun() and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current_world()


def shutdown() -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still writes)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if current_world().distributed:
        dist.barrier()


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small things: generator states, ledger events)."""
    if not current_world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(value: Any, *, what: str) -> None:
    """Raise on every rank unless all ranks hold the same ``value`` (e.g. σ, C, q, the start step)."""
    world = current_world()
    if not world.distributed:
        return
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"ranks disagree on {what}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """In place, every tensor becomes its sum over all ranks (one flat all-reduce; identical result on every rank)."""
    if not current_world().distributed or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for t, s in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(s.view_as(t))
