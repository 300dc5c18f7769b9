"""Backend for a model sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Parameters and gradients are DTensors sharded on dim 0 over the data-parallel mesh. Each backward
reduce-scatters into `p.grad`, accumulating, and `p.grad.to_local()` is a writable view of this
rank's shard: each pass is read there (one `torch._foreach_*` fold over the shards), zeroed, and the
final pass's shards receive the masked mean before the user's `optimizer.step()`. Chunks before the
last of a pass run with gradient sync off, so each pass is reduce-scattered once. With a
`MixedPrecisionPolicy`, the sharded parameters stay the fp32 masters; use `reduce_dtype=float32`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from bidrop_ds.backends.partition import Fragment, ShardedBackend, module_parameters
from bidrop_ds.comm import ProcessGroupCommunicator
from bidrop_ds.config import BiDropConfig


def is_fsdp2_model(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The group of the 1-D mesh the model's parameters are sharded over (None, the default group,
    for a model that Fsdp2Shards refuses)."""
    mesh = next((param.device_mesh for param in model.parameters() if isinstance(param, DTensor)), None)
    return mesh.get_group() if mesh is not None and mesh.ndim == 1 else None


class Fsdp2Shards:
    """This rank's shard of every trainable parameter, in `named_parameters()` order."""

    def __init__(self, model: nn.Module, config: BiDropConfig) -> None:
        self.params: list[nn.Parameter] = []
        self.fragments: list[Fragment] = []
        offset = 0
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if not isinstance(param, DTensor):
                raise ValueError(f"BiDrop: parameter {name!r} is not sharded by fully_shard; apply fully_shard "
                                 "to the root module too")
            if param.device_mesh.ndim != 1 or param.placements != (Shard(0),):
                raise ValueError(f"BiDrop: parameter {name!r} has placements {param.placements} on a "
                                 f"{param.device_mesh.ndim}-D mesh; only FSDP2's Shard(0) on a 1-D mesh is "
                                 "supported (HSDP and tensor parallelism are not)")
            local_shape, global_offset = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements)
            numel = math.prod(local_shape)
            row = math.prod(param.shape[1:])
            self.fragments.append(Fragment(name, global_offset[0] * row if numel else 0, offset, numel,
                                           config.is_eligible(name)))
            self.params.append(param)
            offset += numel
        self.numel = offset
        self.mesh = self.params[0].device_mesh

    accumulates = True  # each backward's reduce-scatter adds to p.grad

    def views(self) -> list[torch.Tensor]:
        for param in self.params:
            if param.grad is None:  # a parameter this batch did not reach
                param.grad = torch.zeros_like(param)
        return [param.grad.to_local().view(-1) for param in self.params]

    def master_views(self) -> list[torch.Tensor]:
        return [param.detach().to_local().view(-1) for param in self.params]

    def written(self) -> None:
        """Nothing: the optimizer reads p.grad as written."""


class Fsdp2Backend(ShardedBackend):
    """Bi-Drop statistics on this rank's FSDP2 shards; the user's optimizer steps."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: BiDropConfig) -> None:
        self.model = model
        self.optimizer = optimizer
        shards = Fsdp2Shards(model, config)
        self.rank = dist.get_rank()
        super().__init__(shards, config, shards.params[0].to_local().device,
                         ProcessGroupCommunicator(shards.mesh.get_group()), module_parameters(model))

    def check_chunks(self, chunks: int) -> None:
        """Any number of chunks works: each pass averages them."""

    def begin_step(self) -> None:
        for param in self.partition.params:
            param.grad = None
        super().begin_step()

    @contextmanager
    def micro_step(self, last_in_pass: bool, last_in_step: bool) -> Iterator[None]:
        """Reduce-scatter once per pass: gradient sync only on the pass's last chunk."""
        self.model.set_requires_gradient_sync(last_in_pass)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor, chunks: int) -> None:
        (loss if chunks == 1 else loss / chunks).backward()

    def grad_scale(self) -> float:
        return 1.0

    def skip_step(self) -> None:
        """Drop the gradients: the optimizer's step then leaves parameters and state alone."""
        self.begin_step()

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.begin_step()
