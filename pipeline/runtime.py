"""Where a stage runs: the device, the torchrun process group, and the global seed.

Kept apart from the training loop so that `extract` (which runs under torchrun too) does not
depend on the trainer's code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (the defaults: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cuda` without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device 'cuda' requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(device)


def init_distributed(device_kind: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_and_distributed(requested: str) -> tuple[torch.device, DistInfo]:
    """The device a stage runs on plus its torchrun rank: under torchrun on GPUs each process
    takes the GPU of its local rank."""
    device = pick_device(requested)
    dist_info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    return device, dist_info


def finish_distributed(dist_info: DistInfo) -> None:
    """Wait for every rank, then leave the process group (a no-op for a single process)."""
    if dist_info.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (and CUDA) globally; return a CPU generator for explicit sampling."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
