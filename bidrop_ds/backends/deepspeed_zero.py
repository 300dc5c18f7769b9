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
from typing import Iterator

import torch
import torch.distributed as dist

from bidrop_ds.comm import ProcessGroupCommunicator
from bidrop_ds.backends.partition import Fragment, ShardedBackend, module_parameters
from bidrop_ds.config import BiDropConfig

VERIFIED_DEEPSPEED = ("0.19.5", "0.20")  # [low, high)


def is_deepspeed_engine(obj: object) -> bool:
    """True for a DeepSpeedEngine, without importing deepspeed unless it is already loaded."""
    return any(cls.__name__ == "DeepSpeedEngine" and cls.__module__.startswith("deepspeed")
               for cls in type(obj).__mro__)


def data_parallel_group(engine) -> dist.ProcessGroup | None:
    """The group over which the engine's ZeRO optimizer partitions (ZeRO-0: the engine's data-parallel group)."""
    return getattr(engine.optimizer, "dp_process_group", None) or engine.data_parallel_group


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
    stage, optimizer = engine.zero_optimization_stage(), type(engine.optimizer).__name__
    if stage == 0 and engine.fp16_enabled():
        refusals.append("ZeRO stage 0 with fp16 (DeepSpeed's FP16_Optimizer); use ZeRO stage 1, 2 or 3 for fp16")
    if stage == 0 and engine.bfloat16_enabled() and optimizer != "FP16_UnfusedOptimizer":
        refusals.append(f"ZeRO stage 0 with bf16 through {optimizer}; only DeepSpeed's default "
                        "(FP16_UnfusedOptimizer, bf16 gradient accumulation) is supported")
    if stage == 1 and optimizer == "BF16_Optimizer":
        refusals.append("ZeRO stage 1 with bf16 and fp32 gradient accumulation (DeepSpeed's BF16_Optimizer); "
                        "use ZeRO stage 2 or 3, or \"data_types\": {\"grad_accum_dtype\": \"bf16\"}")
    if not engine.managed_gradient_accumulation():
        refusals.append("managed_gradient_accumulation=false (Bi-Drop drives the accumulation itself)")
    if refusals:
        raise ValueError("BiDrop does not support these DeepSpeed features: " + "; ".join(refusals)
                         + ". Remove them from the DeepSpeed config.")


class Zero3Partition:
    """ZeRO-3: each backward reduce-scatters into one flat buffer of this rank's grad partitions
    (`grad_partitions_flat_buffer`, in the order of `fp16_groups`); fp32 masters sit in
    `fp32_partitioned_groups_flat[group]` at `grad_position[param_id]`. The buffer accumulates, so it
    is zeroed after each pass is read; the boundary is only the step's final backward."""

    boundary_every_pass = False

    def __init__(self, engine, names: dict[int, str], config: BiDropConfig) -> None:
        opt = engine.optimizer
        self.optimizer = opt
        self.grad: torch.Tensor = opt.grad_partitions_flat_buffer
        self.numel = self.grad.numel()
        by_id = opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        rank = dist.get_rank(group=opt.dp_process_group)
        self.fragments, self._masters = [], []
        for param in (param for group in opt.fp16_groups for param in group):
            offset = (by_id[param.ds_id].data_ptr() - self.grad.data_ptr()) // self.grad.element_size()
            partition = param.partition_numel()
            owned = max(0, min(partition, param.ds_numel - rank * partition))
            name = names[id(param)]
            self.fragments.append(Fragment(name, rank * partition, offset, owned, config.is_eligible(name)))
            group_idx, dest, _ = opt.grad_position[opt.get_param_id(param)]
            self._masters.append((offset, opt.fp32_partitioned_groups_flat[group_idx].detach().narrow(0, dest, owned)))

    def begin_step(self) -> None:
        self.grad.zero_()

    def segments(self) -> list[torch.Tensor]:
        return [self.grad]

    def master(self) -> torch.Tensor:
        """The fp32 master weights aligned with the gradient partition (a copy; padding reads 0)."""
        out = torch.zeros(self.numel, dtype=torch.float32, device=self.grad.device)
        for offset, master in self._masters:
            out[offset:offset + master.numel()] = master
        return out


class Zero12Partition:
    """ZeRO-1/2 (DeepSpeedZeroOptimizer): the end of every pass is made an accumulation boundary, so
    DeepSpeed reduces that pass into this rank's partition and lists it, as views, in
    `averaged_gradients[group]` (laid out like the flat fp32 master partition
    `single_partition_of_fp32_groups[group]`, `partition_size[group]` elements, padding included).
    With 16-bit params and fp32 accumulation that list is one compact fp32 buffer (`flat_partition`)
    that accumulates; otherwise each boundary lists fresh tensors. Either way the pass is read there,
    zeroed after reading, and the final pass's views receive the masked mean for `engine.step()`."""

    boundary_every_pass = True

    def __init__(self, engine, names: dict[int, str], config: BiDropConfig) -> None:
        opt = engine.optimizer
        self.optimizer = opt
        sizes = [int(size) for size in opt.partition_size]
        self.numel = sum(sizes)
        self.fragments, base = [], 0
        for i, size in enumerate(sizes):
            # The partition's layout as DeepSpeed's gradient copies use it. Not `param._hp_mapping`:
            # with round_robin_gradients DeepSpeed links it in the unreordered order (wrong or None).
            partition_id = dist.get_rank(group=opt.real_dp_process_group[i])
            for param in opt.params_in_partition[i]:
                param_id = opt.get_param_id(param)
                start = int(opt.grad_start_offset[i][partition_id][param_id])
                dest = int(opt.grad_partition_insertion_offset[i][partition_id][param_id])
                name = names[id(param)]
                self.fragments.append(Fragment(name, start, base + dest, min(param.numel() - start, size - dest),
                                               config.is_eligible(name)))
            base += size

    def begin_step(self) -> None:
        """Nothing: each pass's boundary lists the pass's own reduced gradient."""

    def segments(self) -> list[torch.Tensor]:
        out = []
        for group in sorted(self.optimizer.averaged_gradients):
            listed = self.optimizer.averaged_gradients[group]
            flat = getattr(listed, "flat_partition", None)
            out += [flat] if flat is not None else list(listed)
        return out

    def master(self) -> torch.Tensor:
        return torch.cat([part.detach() for part in self.optimizer.single_partition_of_fp32_groups]).float()


class Zero0Replica:
    """ZeRO-0: no partitioning; every pass end is a boundary, where DeepSpeed all-reduces `p.grad`
    in place. Every rank then holds the whole reduced gradient, as under DDP, so the statistics
    cover the whole model on every rank (8 bytes per trainable element) and each rank selects
    locally; the masks agree because the reduced gradients are identical. With bf16, DeepSpeed's
    FP16_UnfusedOptimizer keeps fp32 masters in `fp32_groups`, aligned with `fp16_groups`."""

    boundary_every_pass = True
    selects_locally = True

    def __init__(self, engine, names: dict[int, str], config: BiDropConfig) -> None:
        self.params = [param for param in engine.module.parameters() if param.requires_grad]
        opt = engine.optimizer
        masters = {id(low): high for lows, highs in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
                   for low, high in zip(lows, highs)}
        self._masters = [masters.get(id(param), param) for param in self.params]
        self.fragments, offset = [], 0
        for param in self.params:
            name = names[id(param)]
            self.fragments.append(Fragment(name, 0, offset, param.numel(), config.is_eligible(name)))
            offset += param.numel()
        self.numel = offset

    def begin_step(self) -> None:
        for param in self.params:
            param.grad = None

    def segments(self) -> list[torch.Tensor]:
        for param in self.params:
            if param.grad is None:  # a parameter this batch did not reach
                param.grad = torch.zeros_like(param)
        return [param.grad for param in self.params]

    def master(self) -> torch.Tensor:
        return torch.cat([master.detach().reshape(-1) for master in self._masters]).float()


class DeepSpeedBackend(ShardedBackend):
    """Bi-Drop statistics on this rank's ZeRO gradient partition, stepped by the engine."""

    def __init__(self, engine, config: BiDropConfig) -> None:
        _check_version()
        _check_features(engine)
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        names = {id(param): name for name, param in engine.module.named_parameters()}
        adapters = {0: Zero0Replica, 1: Zero12Partition, 2: Zero12Partition, 3: Zero3Partition}
        if self.stage not in adapters:
            raise NotImplementedError(f"BiDrop: DeepSpeed ZeRO stage {self.stage} is not supported yet "
                                      f"(supported: {sorted(adapters)})")
        partition = adapters[self.stage](engine, names, config)
        self.rank = dist.get_rank()
        comm = ProcessGroupCommunicator(data_parallel_group(engine))
        super().__init__(partition, config, torch.device(engine.device), comm,
                         module_parameters(engine.module), selects_locally=getattr(partition, "selects_locally", False))

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
        self.partition.begin_step()

    @contextmanager
    def micro_step(self, last_in_pass: bool, last_in_step: bool) -> Iterator[None]:
        """Mark DeepSpeed's accumulation boundary: every pass end where the stage reduces there,
        else only the step's final backward (which readies DeepSpeed's step)."""
        every_pass = self.partition.boundary_every_pass
        self.engine.set_gradient_accumulation_boundary(last_in_pass if every_pass else last_in_step)
        yield

    def backward(self, loss: torch.Tensor, chunks: int) -> None:
        """engine.backward divides by gradient_accumulation_steps, which check_chunks made = chunks."""
        self.engine.backward(loss)

    def grad_scale(self) -> float:
        """The fp16 loss scale the partition's gradients carry (DeepSpeed unscales in its step)."""
        return float(self.engine.optimizer.loss_scale) if self.engine.fp16_enabled() else 1.0

    def skip_step(self) -> None:
        """Skip on every rank. fp16 takes DeepSpeed's overflow path (the step sees inf, skips, and
        backs the loss scale off); otherwise the engine does not step and the gradients are zeroed."""
        segments = self.partition.segments()
        if self.engine.fp16_enabled():
            for segment in segments:  # a rare path: a plain loop is fine
                segment.fill_(float("inf"))
            self.optimizer_step()
        else:
            torch._foreach_zero_(segments)

    def optimizer_step(self) -> None:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.optimizer.zero_grad()
        self.engine.set_gradient_accumulation_boundary(False)
