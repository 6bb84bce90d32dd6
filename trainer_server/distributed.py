"""Data parallelism with torch.distributed: rank 0 leads, the other ranks follow its commands.

Under `torchrun --nproc-per-node K -m trainer_server ...` every process loads the model; rank 0
also serves gRPC and owns the store. For each optimizer step rank 0 broadcasts the whole batch
(token ids and rows are small), every rank takes its contiguous shard, computes its part of the
loss's gradient, and the gradients are summed with all_reduce (the loss normalization is global,
see training.py), so every rank applies the same update and the weights stay identical.

The followers run `follow()`: a loop that receives commands (step, stop; under --fsdp also
gather, for a publish, and checkpoint, whose shards come together on rank 0) and runs them in the
same order as rank 0, which is all torch.distributed needs to match collectives. Under --fsdp the
weights are sharded instead of replicated and FSDP2 reduce-scatters the gradients
(trainer_server/model.py).
gloo on CPU, NCCL on GPUs. One process (no torchrun) uses `Collective(0, 1)`, whose operations
are no-ops, so the single-process path is the same code.
"""

from __future__ import annotations

import datetime
import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Followers block in a broadcast while rank 0 waits for annotations; that can take days.
IDLE_TIMEOUT = datetime.timedelta(days=30)


class Collective:
    """The few collectives the trainer uses; no-ops when world_size == 1."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank = rank
        self.world_size = world_size

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def broadcast(self, obj=None):
        """Rank 0's object on every rank (pickled; for commands and batches, not tensors)."""
        if not self.active:
            return obj
        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def shard(self, count: int, rank: int | None = None) -> slice:
        """This rank's (or `rank`'s) contiguous part of `count` items (sizes differ by at most one)."""
        rank = self.rank if rank is None else rank
        start = rank * count // self.world_size
        stop = (rank + 1) * count // self.world_size
        return slice(start, stop)


def init(rank: int, world_size: int, device: torch.device) -> Collective:
    """Join the process group torchrun describes (env://): gloo on CPU, NCCL on CUDA."""
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=IDLE_TIMEOUT)
        log.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return Collective(rank, world_size)


def ignore_termination() -> None:
    """Followers leave when rank 0 says stop (after its last step and checkpoint), not on the
    SIGTERM torchrun forwards to every rank; a rank 0 that dies ends them through the broken
    process group, and torchrun's SIGKILL escalation remains."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
