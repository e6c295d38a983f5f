"""torch.distributed support: shard featurization over ranks, reduce scores.

When ``torch.distributed`` is initialised (for example by :func:`init` under
``torchrun``), :class:`hessfree.Influence` splits the training batches over the
ranks (batch ``b`` goes to rank ``b % world_size``), each rank featurizes its
share (into the shared store when ``store=`` is given), and every score is
summed across ranks so that all ranks return the full result, equal to a
single-process run up to float rounding.

    torchrun --nproc_per_node=2 my_script.py     # my_script.py calls hf.distributed.init()
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def is_active() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RankFailedError(RuntimeError):
    """Raised on every other rank when one rank failed while computing its share
    (the failing rank raises its own error); no rank is left waiting."""


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the process group from the ``torchrun`` environment variables.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); default ``nccl`` when CUDA
            is available, else ``gloo``.

    Returns ``(rank, world_size)``. Outside ``torchrun`` (no ``RANK`` /
    ``WORLD_SIZE`` in the environment) nothing is initialised and ``(0, 1)`` is
    returned.
    """
    if dist.is_initialized():
        return rank_and_world()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank_and_world()


def barrier() -> None:
    if is_active():
        dist.barrier()


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """Elementwise sum of ``array`` over ranks (float64), returned on every rank."""
    if not is_active():
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
