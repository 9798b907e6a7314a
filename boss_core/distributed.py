"""Data-parallel fine-tuning under ``torchrun``: who this process is, and the few collectives.

``torchrun`` starts W = nnodes * nproc_per_node processes and tells each its place through the
environment (RANK in [0, W), WORLD_SIZE = W, LOCAL_RANK = its index on its node). Every rank
builds the same global batch of B rows and keeps the rows

    rank_slice(B) = [rank * B / W, (rank + 1) * B / W)        (B divisible by W),

so the shards are equal. DistributedDataParallel averages the shard gradients,

    g = (1 / W) sum_r grad L_r,   L_r = mean over the B / W rows of rank r,

which is the gradient of the global-batch mean loss: the math of one process with batch B,
up to float32 reduction order. The backend is NCCL for CUDA devices (rank r uses
``cuda:LOCAL_RANK``) and gloo on the CPU. ``Dist()`` (world size 1) is a plain single
process: no process group, every collective the identity.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor


def backend_for(device: torch.device) -> str:
    """The process-group backend for ``device``: "nccl" for CUDA, "gloo" otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel job: rank in [0, world_size), local_rank on
    its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        for name, low in (("rank", 0), ("world_size", 1), ("local_rank", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Dist:
        """From torchrun's RANK, WORLD_SIZE and LOCAL_RANK (absent: a single process)."""
        env = os.environ if env is None else env
        try:
            return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                       int(env.get("LOCAL_RANK", 0)))
        except ValueError as err:
            raise ValueError(f"bad torchrun environment (RANK={env.get('RANK')!r}, "
                             f"WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                             f"LOCAL_RANK={env.get('LOCAL_RANK')!r}): {err}") from err

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process, so collectives talk to the others."""
        return self.world_size > 1

    def device(self, device: torch.device | str) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` when ``device`` is CUDA and the job has
        several ranks (one GPU per process), else ``device`` unchanged."""
        device = torch.device(device)
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def init_process_group(self, device: torch.device | str) -> None:
        """Join the job's process group (``backend_for(device)``; torchrun's MASTER_ADDR and
        MASTER_PORT rendezvous); on CUDA also make ``self.device(device)`` current. A no-op
        for one process or when this process already joined."""
        if not self.active or torch_dist.is_initialized():
            return
        device = self.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(backend_for(device), rank=self.rank,
                                      world_size=self.world_size)

    def destroy_process_group(self) -> None:
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    def check_ready(self) -> None:
        """Raise unless a multi-rank Dist has its process group (collectives would fail)."""
        if self.active and not torch_dist.is_initialized():
            raise ValueError(f"world_size {self.world_size} needs torch.distributed's process "
                             "group: call Dist.init_process_group(device) first")

    def rank_slice(self, global_batch: int) -> slice:
        """Rows ``[rank * B / W, (rank + 1) * B / W)`` of a global batch of B rows.

        Raises:
            ValueError: B not divisible by W (unequal shards would weight rows unequally).
        """
        if global_batch % self.world_size:
            raise ValueError(
                f"the global batch size {global_batch} (straighten.batch_size) is not "
                f"divisible by the world size {self.world_size} (scale.nnodes * "
                f"scale.nproc_per_node): every rank takes an equal share of the batch")
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def all_mean(self, value: Tensor) -> Tensor:
        """(1 / W) sum_r value_r as a float64 tensor of value's shape, the same on every
        rank (``value`` itself for one process, in float64)."""
        out = value.detach().to(torch.float64).clone()
        if self.active:
            torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
            out /= self.world_size
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; other ranks pass anything, e.g. None)."""
        if not self.active:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()
