"""What a torchrun launcher gives each rank, for tests that spawn 2 gloo processes on this CPU."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_rank(rank: int, world_size: int, port: int, cache_dir: str) -> None:
    """The environment torchrun sets for `rank` (plus the test session's cache dir), one thread per rank."""
    import torch

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "KDIQA_CACHE": cache_dir})
    torch.set_num_threads(1)
