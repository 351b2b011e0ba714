"""Sharding a run across `torchrun` processes.

Batches are dealt round-robin: in round r, rank k computes batch r*world + k. Rank 0 gathers each
round's results and writes them in batch order, so the records of an N-process run come out in the
same order, and with the same content, as those of a 1-process run. Rank 0 is the only process that
writes the run directory or talks to MLflow. NCCL between GPUs, gloo between CPU processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, resolved: str) -> str:
        """Under torchrun, plain `cuda` means this process's own GPU (cuda:LOCAL_RANK)."""
        return f"cuda:{self.local_rank}" if self.active and resolved == "cuda" else resolved

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object on rank 0 (in rank order); an empty list elsewhere."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out or []

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object, on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def from_environment() -> Shard:
    """The shard torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK; a single shard without them."""
    from evals.models.yamlspec import InputError

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise InputError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from exc
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return Shard(rank, world, local_rank)


def start(shard: Shard, device: str) -> None:
    """Join the process group (once per process): NCCL for CUDA devices, gloo for the CPU."""
    if not shard.active:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")


def stop(shard: Shard) -> None:
    if not shard.active:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
