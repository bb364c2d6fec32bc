"""Data parallel: several processes started by `torchrun` (or `accelerate launch`, which runs torchrun) share
one job. gloo on the CPU, NCCL on CUDA (one GPU per process: cuda:LOCAL_RANK).

    dd, device = setup(device)             # Dist(rank, world); a plain run is Dist(0, 1) and never initializes
    for item, result in dd.spread(items, fn):   # fn(item) on rank i % world for item i; every rank gets every
        ...                                      # result, in item order, round by round
    dd.main                                # rank 0: the one that prints and writes

Evaluation and training both use it; nothing here knows what is being run.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass

from simba_cli.errors import UserError

if typing.TYPE_CHECKING:
    import torch


class RankFailed(UserError):
    """Another process of a data-parallel run failed; its own error is the one to read."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or a plain run): whether this process prints and writes. Readable before `setup` (and without
    importing torch)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (what rank 0 read from disk, for example)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def spread(self, items: list, fn):
        """Yield (item, fn(item)) for every item, in order, on every rank: item i is computed on rank
        i % world, a round of `world` items at a time, and the round's results are gathered on every rank.
        An error on any rank ends every rank (there: `RankFailed`), instead of leaving the others waiting."""
        if self.world == 1:
            for item in items:
                yield item, fn(item)
            return
        for start in range(0, len(items), self.world):
            chunk = items[start:start + self.world]
            error, result = None, None
            if self.rank < len(chunk):
                try:
                    result = fn(chunk[self.rank])
                except Exception as e:  # noqa: BLE001  (passed on to every rank, then raised here)
                    error = e
            gathered = self.all_gather((None if error is None else f"{type(error).__name__}: {error}", result))
            failed = [(r, msg) for r, (msg, _) in enumerate(gathered) if msg is not None]
            if error is not None:
                raise error
            if failed:
                raise RankFailed(f"process {failed[0][0]} of {self.world} failed: {failed[0][1]}")
            for item, (_, value) in zip(chunk, gathered):
                yield item, value


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the data-parallel group when started by torchrun (WORLD_SIZE > 1); the device to run on.

    CUDA: each process takes cuda:LOCAL_RANK and NCCL, whatever index was asked for (lm-eval asks every process
    for cuda:0; two processes on one device make NCCL fail); otherwise gloo, and the CPU cores are shared between
    the processes of a machine instead of oversubscribed."""
    import torch
    import torch.distributed as dist

    world = world_size()
    if world == 1:
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        import numba

        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return Dist(dist.get_rank(), dist.get_world_size()), device


def end():
    """After a command's work: every process waits for the others (rank 0 writing its outputs), then leaves
    the group. Not on an error: torchrun ends the other processes of a failed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
