"""Backend for a DeepSpeed engine: Bi-Drop on this rank's ZeRO gradient partition.

Every access to DeepSpeed internals lives in this module, in one adapter per stage family, and is
verified on the DeepSpeed versions in VERIFIED_DEEPSPEED (other versions are refused with a clear
error, since the private state read here may move between releases).

Driving: a step with c chunks runs k x c micro-steps. The DeepSpeed config's
gradient_accumulation_steps must equal c (train_batch_size = micro batch x c x world: the batch
Bi-Drop sees, each sample k times), so `engine.backward` divides each chunk's loss by c and a pass's
gradient is the chunk average. The accumulation boundary is held False through the passes and set
True only for the final `engine.step()`, so DeepSpeed steps once, with its own unscale, overflow
check, clipping and optimizer on the masked mean written into the partition.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from bidrop_ds.comm import ProcessGroupCommunicator
from bidrop_ds.config import BiDropConfig

VERIFIED_DEEPSPEED = ("0.19.5", "0.20")  # [low, high)


@dataclass(frozen=True)
class Fragment:
    """The piece of one parameter held in this rank's flat gradient partition."""

    name: str
    start: int      # first element held, in the flattened parameter
    offset: int     # where it sits in the flat partition
    numel: int      # valid elements (partition padding excluded)
    eligible: bool


def is_deepspeed_engine(obj: object) -> bool:
    """True for a DeepSpeedEngine, without importing deepspeed unless it is already loaded."""
    return any(cls.__name__ == "DeepSpeedEngine" and cls.__module__.startswith("deepspeed")
               for cls in type(obj).__mro__)


def _check_version() -> None:
    import deepspeed
    from packaging.version import Version

    low, high = VERIFIED_DEEPSPEED
    if not Version(low) <= Version(deepspeed.__version__) < Version(high):
        raise RuntimeError(f"bidrop_ds reads DeepSpeed's ZeRO gradient partitions, verified on "
                           f"deepspeed >= {low}, < {high}; this is {deepspeed.__version__}. "
                           f"Install a verified version: pip install 'deepspeed>={low},<{high}'")


def _check_features(engine) -> None:
    refusals = []
    if type(engine).__name__ == "PipelineEngine":
        refusals.append("pipeline parallelism (PipelineEngine)")
    zero = engine._config.zero_config
    if getattr(zero, "zero_quantized_gradients", False):
        refusals.append("ZeRO++ quantised gradients (zero_quantized_gradients)")
    if getattr(zero, "zero_hpz_partition_size", 1) > 1:
        refusals.append("ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1)")
    if engine.zero_offload_optimizer() is not None and getattr(engine.zero_offload_optimizer(), "device", "none") != "none":
        refusals.append("optimizer offload (offload_optimizer)")
    if engine.zero_offload_param() is not None and getattr(engine.zero_offload_param(), "device", "none") != "none":
        refusals.append("parameter offload (offload_param)")
    if not engine.managed_gradient_accumulation():
        refusals.append("managed_gradient_accumulation=false (Bi-Drop drives the accumulation itself)")
    if refusals:
        raise ValueError("BiDrop does not support these DeepSpeed features: " + "; ".join(refusals)
                         + ". Remove them from the DeepSpeed config.")


class Zero3Partition:
    """ZeRO-3: each backward reduce-scatters into one flat buffer of this rank's grad partitions
    (`grad_partitions_flat_buffer`, in the order of `fp16_groups`); fp32 masters sit in
    `fp32_partitioned_groups_flat[group]` at `grad_position[param_id]`."""

    def __init__(self, engine, names: dict[int, str], config: BiDropConfig) -> None:
        opt = engine.optimizer
        self.optimizer = opt
        self.grad: torch.Tensor = opt.grad_partitions_flat_buffer
        params = [param for group in opt.fp16_groups for param in group]
        by_id = opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        rank = dist.get_rank(group=opt.dp_process_group)
        self.fragments, self._masters = [], []
        base = self.grad.data_ptr()
        for param in params:
            view = by_id[param.ds_id]
            offset = (view.data_ptr() - base) // self.grad.element_size()
            partition = param.partition_numel()
            owned = max(0, min(partition, param.ds_numel - rank * partition))
            name = names[id(param)]
            self.fragments.append(Fragment(name, rank * partition, offset, owned, config.is_eligible(name)))
            group_idx, dest, _ = opt.grad_position[opt.get_param_id(param)]
            self._masters.append((offset, opt.fp32_partitioned_groups_flat[group_idx].detach().narrow(0, dest, owned)))

    def master(self) -> torch.Tensor:
        """The fp32 master weights aligned with the gradient partition (a copy; padding reads 0)."""
        out = torch.zeros(self.grad.numel(), dtype=torch.float32, device=self.grad.device)
        for offset, master in self._masters:
            out[offset:offset + master.numel()] = master
        return out


class DeepSpeedBackend:
    """Bi-Drop statistics on this rank's ZeRO gradient partition, stepped by the engine."""

    def __init__(self, engine, config: BiDropConfig) -> None:
        _check_version()
        _check_features(engine)
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        names = {id(param): name for name, param in engine.module.named_parameters()}
        if self.stage == 3:
            self.partition = Zero3Partition(engine, names, config)
        else:
            raise NotImplementedError(f"BiDrop: DeepSpeed ZeRO stage {self.stage} is not supported yet "
                                      "(supported: 3)")
        self.device = self.partition.grad.device
        self.numel = self.partition.grad.numel()
        self.rank = dist.get_rank()
        self.selection_comm = ProcessGroupCommunicator(self.partition.optimizer.dp_process_group)
        self.agreement_comm = self.selection_comm
        eligible = torch.tensor([sum(f.numel for f in self.partition.fragments if f.eligible)],
                                dtype=torch.int64, device=self.device)
        self.selection_comm.all_reduce_sum(eligible)
        self.total_numel = int(eligible.item())
        if self.total_numel == 0:
            raise ValueError(f"BiDrop: include={list(config.include)} / exclude={list(config.exclude)} select "
                             f"no trainable parameter (names look like {self.partition.fragments[0].name!r})")
        self._ineligible = _merge_ranges(self.numel, [(f.offset, f.offset + f.numel)
                                                      for f in self.partition.fragments if f.eligible])

    def check_chunks(self, chunks: int) -> None:
        gas = self.engine.gradient_accumulation_steps()
        if gas != chunks:
            micro = self.engine.train_micro_batch_size_per_gpu()
            world = dist.get_world_size()
            raise ValueError(
                f"BiDrop: the DeepSpeed config has gradient_accumulation_steps={gas} but this step has "
                f"{chunks} chunk(s). Set gradient_accumulation_steps={chunks} and train_batch_size="
                f"{micro * chunks * world} (micro batch {micro} x {chunks} chunks x {world} ranks): a Bi-Drop "
                "step runs its k passes over the chunks of one batch itself.")

    def begin_step(self) -> None:
        self.engine.set_gradient_accumulation_boundary(False)
        self.partition.grad.zero_()

    @contextmanager
    def chunk_context(self, last_chunk: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor, chunks: int) -> None:
        """engine.backward divides by gradient_accumulation_steps, which check_chunks made = chunks."""
        self.engine.backward(loss)

    def pass_gradient(self) -> torch.Tensor:
        return self.partition.grad

    def end_pass(self) -> None:
        self.partition.grad.zero_()

    def abs_params(self) -> torch.Tensor:
        return self.partition.master().abs_()

    def exclude_ineligible(self, scores: torch.Tensor) -> None:
        """Mark elements outside the eligible parameters (and padding) as no candidates."""
        for start, end in self._ineligible:
            scores[start:end] = -1.0

    def others_finite(self) -> bool:
        return True  # every trainable element is in the statistics

    def write_gradients(self, update: torch.Tensor, passes: int) -> None:
        self.partition.grad.copy_(update)

    def drop_gradients(self) -> None:
        self.partition.grad.zero_()

    def optimizer_step(self) -> None:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()

    def zero_grad(self) -> None:
        self.partition.grad.zero_()
        self.engine.optimizer.zero_grad()
        self.engine.set_gradient_accumulation_boundary(False)


def _merge_ranges(total: int, keep: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The complement of the `keep` ranges in [0, total), as few ranges as possible."""
    out, cursor = [], 0
    for start, end in sorted(keep):
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < total:
        out.append((cursor, total))
    return out
