"""Devices and processes: torch DDP as torchrun launches it (gloo on CPU, nccl on CUDA), and rank helpers.

Every helper is a no-op in a single process, so the train loop calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from kdiqa_edge.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistContext()


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch lists every device type it knows, in a paragraph
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1); otherwise a single process."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size <= 1:
        return DistContext(), device
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank), device


@contextlib.contextmanager
def main_process_first(ctx: DistContext):
    """Rank 0 runs the block first (building a cache); the others run it after (opening what rank 0 built)."""
    if ctx.enabled and not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.enabled and ctx.is_main:
        barrier(ctx)


def barrier(ctx: DistContext) -> None:
    """Wait for every process (a no-op in a single one)."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_gather_object(ctx: DistContext, obj) -> list:
    """Every process's `obj`, in rank order (`[obj]` in a single process)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(ctx: DistContext, value):
    """Rank 0's `value` in every process (a default run dir carries a timestamp that could differ by rank)."""
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the processes, in place."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def process_group_exists() -> bool:
    """A process group someone already set up (a pipeline running several training stages)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def destroy_process_group() -> None:
    if process_group_exists():
        torch.distributed.destroy_process_group()
