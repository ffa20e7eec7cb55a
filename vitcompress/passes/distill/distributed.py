"""Data-parallel training under torchrun: the process group (gloo on CPU, nccl on GPU) and this
process's rank and world size."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); no-op in a single process."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()
