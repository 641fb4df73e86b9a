"""Data-parallel training across processes (torchrun or ``accelerate launch``).

Every process holds the whole model and draws the same global batches from
the same seeded generator; process r trains on stories r, r+W, r+2W, ... of
each global batch. Losses are summed over pairs and divided by the global
number of pairs, and gradients are summed across processes, so a W-process
step equals a 1-process step on the same global batch (up to float
summation order). Only rank 0 writes files.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


class Dist:
    """The process group as the training recipe sees it; a no-op with one process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, device: torch.device) -> torch.device:
        """Join the process group (gloo on CPU, nccl on GPU); returns this process's device."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def shard_rows(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sync_grads(self, params) -> None:
        """Sum gradients across processes (a process with no stories contributes zeros)."""
        if not self.enabled:
            return
        for p in params:
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def teardown(self) -> None:
        """Leave the group. A plain destroy_process_group() aborts in gloo's thread about 1 run in 10 at exit;
        collecting garbage first (models and optimisers already dropped by the caller) avoids it."""
        if self.enabled and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
