"""Data-parallel training with ``torch.distributed`` (launch with ``torchrun``).

Every process takes its contiguous share of each global batch (the same permutation on every rank,
so the union of the shares is the single-process batch), computes the loss on it, and the gradients
are averaged with an all-reduce before clipping and the optimiser step. This works for every method,
including those whose bounds never call ``model.forward`` (which is why DistributedDataParallel's
hooks are not used). BatchNorm uses each rank's own batch statistics (no SyncBatchNorm). Rank 0
writes checkpoints, metrics and results; the others wait at barriers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def share(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch of indices."""
        return idx.tensor_split(self.world)[self.rank] if self.enabled else idx

    def average_gradients(self, params) -> None:
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world)

    def broadcast_flag(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True on every rank if it is true on any (e.g. a non-finite loss on one rank). ``device``:
        the training device (NCCL reduces CUDA tensors only)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else a no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(local)
    return Dist(rank=rank, world=world, local_rank=local)
