"""Communicators for the core's selection: the torch.distributed one lives here, outside the core."""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist

from bidrop_ds.core.select import LocalCommunicator


class ProcessGroupCommunicator:
    """All-reduces over a torch.distributed process group (None = the default group).

    `device`: where the group's backend reduces (e.g. the GPU for NCCL). A tensor held elsewhere
    (statistics in host memory under ZeRO-Offload) is reduced through a copy there: the core only
    reduces small histograms and flags (at most 8 KiB)."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> None:
        self.group = group
        self.device = device

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self.device is None or tensor.device == self.device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            return
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=self.group)
        tensor.copy_(moved)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in group rank order."""
        out = [None] * dist.get_world_size(group=self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out


def default_communicator() -> ProcessGroupCommunicator | LocalCommunicator:
    """The default process group if one is initialised, else the local (single-process) one."""
    if dist.is_available() and dist.is_initialized():
        return ProcessGroupCommunicator()
    return LocalCommunicator()


def close_process_group() -> None:
    """End a run's default process group cleanly: collect garbage, meet at a barrier, destroy it.

    Call it on every rank after the work, with each DeepSpeed engine destroyed and no reference to it
    (or its model and optimizer) left: gloo runs that skip this abort at exit at random, "terminate
    called without an active exception", from gloo threads the engine's leftovers keep alive."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
