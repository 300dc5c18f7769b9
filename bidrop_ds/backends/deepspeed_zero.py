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
from bidrop_ds.backends.partition import Fragment, ShardedBackend, module_parameters, zero_all
from bidrop_ds.config import BiDropConfig

VERIFIED_DEEPSPEED = ("0.19.8", "0.20")  # [low, high)


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
    stage, optimizer = engine.zero_optimization_stage(), type(engine.optimizer).__name__
    offloads = {"offload_optimizer": engine.zero_offload_optimizer(), "offload_param": engine.zero_offload_param()}
    for key, offload in offloads.items():
        device = str(getattr(getattr(offload, "device", None), "value", getattr(offload, "device", "none")))
        if device == "nvme":
            refusals.append(f"NVMe offload ({key}.device = nvme): it needs DeepSpeed's async I/O op (libaio), "
                            "which bidrop-ds has not verified; use \"device\": \"cpu\"")
        if device == "cpu" and float(getattr(offload, "ratio", 1.0)) < 1.0:
            refusals.append(f"partial optimizer offload ({key}.ratio < 1)")
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
    `fp32_partitioned_groups_flat[group]` at `grad_position[param_id]`. The buffer accumulates, so
    a pass's eligible elements are zeroed after they are read; the boundary is only the step's
    final backward."""

    boundary_every_pass = False
    accumulates = True

    def __init__(self, engine, names: dict[int, str], config: BiDropConfig) -> None:
        opt = engine.optimizer
        self.engine, self.optimizer = engine, opt
        self.grad: torch.Tensor = opt.grad_partitions_flat_buffer
        by_id = opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        rank = dist.get_rank(group=opt.dp_process_group)
        # With offload_optimizer the buffer is in host memory, and the step's final backward (the
        # boundary) copies it into the host fp32 gradient `fp32_partitioned_groups_flat[g].grad`
        # that the optimizer reads, recording each parameter's norm for clipping on the way.
        self.offload = bool(opt.offload_optimizer)
        self.fragments, self._views, self._masters, self._offloaded, self._param_ids = [], [], [], [], []
        for param in (param for group in opt.fp16_groups for param in group):
            offset = (by_id[param.ds_id].data_ptr() - self.grad.data_ptr()) // self.grad.element_size()
            partition = param.partition_numel()
            owned = max(0, min(partition, param.ds_numel - rank * partition))
            name = names[id(param)]
            self.fragments.append(Fragment(name, rank * partition, offset, owned, config.is_eligible(name)))
            self._views.append(self.grad.narrow(0, offset, owned))
            group_idx, dest, _ = opt.grad_position[opt.get_param_id(param)]
            master = opt.fp32_partitioned_groups_flat[group_idx]
            self._masters.append(master.detach().narrow(0, dest, owned))
            if self.offload:
                self._offloaded.append(master.grad.narrow(0, dest, owned))
                self._param_ids.append(opt.get_param_id(param))

    def begin_step(self) -> None:
        self.grad.zero_()

    def views(self) -> list[torch.Tensor]:
        if self.offload and self.engine.is_gradient_accumulation_boundary():
            return self._offloaded
        return self._views

    def master_views(self) -> list[torch.Tensor]:
        return self._masters

    def written(self) -> None:
        """Offload: the clipping norms DeepSpeed recorded at the boundary become those of the
        gradient written (the masked mean), not of the last pass."""
        if self.offload:
            _record_norms(self.optimizer, self._param_ids, self._offloaded)

    def skipped(self) -> None:
        """A step skipped without DeepSpeed's: forget the offload window's parameters as its step
        would (the micro-step count restarts in zero_grad)."""
        if hasattr(self.optimizer, "_offload_boundary_param_ids"):
            self.optimizer._offload_boundary_param_ids = set()


class Zero12Partition:
    """ZeRO-1/2 (DeepSpeedZeroOptimizer), laid out like the flat fp32 master partition
    `single_partition_of_fp32_groups[group]` (`partition_size[group]` elements, padding included).
    Where each pass's reduced gradient lives:
    - 16-bit params with fp32 accumulation: one compact fp32 buffer per group (`flat_partition`,
      listed in `averaged_gradients[group]`) that every reduction adds to;
    - otherwise ZeRO-2 reduces at every backward into per-parameter accumulators
      (`all_grad_tensors[group]`, full-shape, this rank's fragment valid), which DeepSpeed lists as
      views in `averaged_gradients[group]` at the boundary; so ZeRO-2 needs a boundary only at the
      step's final backward, and the accumulators sum the ineligible elements through the passes;
    - ZeRO-1 reduces only at a boundary, so every pass ends in one, and each boundary lists fresh
      tensors (they do not accumulate, unless compact).
    The final pass's views receive the masked mean for `engine.step()`.
    ZeRO-2 with fp32 accumulators and k = 2 `retains` pass 1: `release()` drops DeepSpeed's
    accumulators, so pass 2 starts fresh ones (as its first micro-step would) while Bi-Drop keeps
    pass 1 where it is: one buffer of pass 1 in all, where copying it out would keep two."""

    def __init__(self, engine, names: dict[int, str], config: BiDropConfig) -> None:
        opt = engine.optimizer
        self.engine, self.optimizer = engine, opt
        self.boundary_every_pass = engine.zero_optimization_stage() == 1
        groups = range(len(opt.partition_size))
        compact = [opt._use_compact_grad_partition_buffer(i) for i in groups]
        self.offload = bool(opt.cpu_offload)
        self.retains = (config.k == 2 and not self.boundary_every_pass and not self.offload and not any(compact)
                        and opt.gradient_accumulation_dtype == torch.float32)
        self.accumulates = not self.retains and (not self.boundary_every_pass or all(compact))
        self.fragments, self._places, self._masters, self._offloaded, base = [], [], [], [], 0
        for i in groups:
            size = int(opt.partition_size[i])
            master = opt.single_partition_of_fp32_groups[i].detach()
            offloaded = opt.single_partition_of_fp32_groups[i].grad if self.offload else None
            # The partition's layout as DeepSpeed's gradient copies use it. Not `param._hp_mapping`:
            # with round_robin_gradients DeepSpeed links it in the unreordered order (wrong or None).
            partition_id = dist.get_rank(group=opt.real_dp_process_group[i])
            for index, param in enumerate(opt.params_in_partition[i]):
                param_id = opt.get_param_id(param)
                start = int(opt.grad_start_offset[i][partition_id][param_id])
                dest = int(opt.grad_partition_insertion_offset[i][partition_id][param_id])
                numel = max(0, min(param.numel() - start, size - dest))
                name = names[id(param)]
                self.fragments.append(Fragment(name, start, base + dest, numel, config.is_eligible(name)))
                self._places.append((i, index, start, dest, numel, param_id))
                self._masters.append(master.narrow(0, dest, numel))
                if self.offload:
                    self._offloaded.append(offloaded.narrow(0, dest, numel))
            base += size

    def begin_step(self) -> None:
        """Nothing: each step's first reduction starts DeepSpeed's accumulators afresh."""

    def begin_window(self) -> None:
        """Before a pass's reducing backward on ZeRO-1 (each pass its own accumulation window):
        under offload, make it the window's first micro-step for DeepSpeed. Its micro-step count
        restarts only in `step()`, and from the second reduction on its offload path adds the host
        accumulator (`accumulated_grads_in_cpu`), which then holds an earlier pass (this step's
        previous one, or the last step's last): the pass is copied straight into the host fp32
        partition instead, as DeepSpeed does for a window of one micro-step."""
        if self.offload:
            self._restart_micro_steps()

    def _restart_micro_steps(self) -> None:
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        self.optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
        if self.offload:
            self.optimizer._offload_accumulated_param_ids = set()

    def views(self) -> list[torch.Tensor]:
        opt, out, listed_by_group = self.optimizer, [], {}
        if self.offload and self.engine.is_gradient_accumulation_boundary():
            return self._offloaded  # the boundary copied the gradient into the host fp32 partition
        for group, index, start, dest, numel, param_id in self._places:
            listed = opt.averaged_gradients.get(group)
            flat = getattr(listed, "flat_partition", None)
            accumulated = opt.all_grad_tensors.get(group)
            if flat is not None:
                out.append(flat.narrow(0, dest, numel))
            elif self.offload:  # ZeRO-2 offload between boundaries: DeepSpeed's host accumulator
                out.append(opt.accumulated_grads_in_cpu[param_id].view(-1).narrow(0, start, numel))
            elif accumulated is not None:  # ZeRO-2 between boundaries
                out.append(accumulated[index].view(-1).narrow(0, start, numel))
            else:  # at a boundary: one entry per parameter, in order, with marked padding between
                if group not in listed_by_group:
                    listed_by_group[group] = [t for t in listed if not getattr(t, "_zero_padding", False)]
                out.append(listed_by_group[group][index].view(-1))
        return out

    def master_views(self) -> list[torch.Tensor]:
        return self._masters

    def release(self) -> None:
        """Hand the accumulators of the passes so far over to the caller (who holds views of them):
        DeepSpeed's next reduction starts new ones."""
        for group in self.optimizer.all_grad_tensors:
            self.optimizer.all_grad_tensors[group] = None

    def written(self) -> None:
        """Offload: the clipping norms recorded at the boundary become those of the written gradient."""
        if self.offload:
            _record_norms(self.optimizer, [place[-1] for place in self._places], self._offloaded)

    def skipped(self) -> None:
        """A step skipped without DeepSpeed's: drop what its step would have consumed. Its
        micro-step count (else the next step's first pass adds to the skipped ones); the listed
        gradients (`averaged_gradients`: under offload with fp32 accumulation of 16-bit gradients
        a compact buffer that keeps summing, the skipped passes included); under offload also
        the host accumulators, and the overflow flag and norms recorded as the skipped passes
        reached the host (`reset_cpu_buffers`; a stale overflow flag skips the next step in bf16)."""
        self._restart_micro_steps()
        for group in self.optimizer.averaged_gradients:
            self.optimizer.averaged_gradients[group] = None
        if self.offload:
            zero_all(list(self.optimizer.accumulated_grads_in_cpu.values()))
            self.optimizer.reset_cpu_buffers()


def _record_norms(optimizer, param_ids: list[int], grads: list[torch.Tensor]) -> None:
    """Under offload DeepSpeed clips with per-parameter norms it records as each gradient reaches
    the host partition (`norm_for_param_grads`); Bi-Drop rewrites those gradients afterwards."""
    from deepspeed.runtime.zero.utils import get_norm_dtype

    for param_id, grad in zip(param_ids, grads):
        if param_id in optimizer.norm_for_param_grads:
            optimizer.norm_for_param_grads[param_id] = grad.to(get_norm_dtype()).norm(2)


class Zero0Replica:
    """ZeRO-0: no partitioning; every pass end is a boundary, where DeepSpeed all-reduces `p.grad`
    in place (an ineligible `p.grad` left in place holds the reduced earlier passes plus this
    rank's new one, so the all-reduce keeps the sum). Every rank then holds the whole reduced
    gradient, as under DDP, so the statistics cover every eligible element on every rank and each
    rank selects locally; the masks agree because the reduced gradients are identical. With bf16,
    DeepSpeed's FP16_UnfusedOptimizer keeps fp32 masters in `fp32_groups`, aligned with `fp16_groups`."""

    boundary_every_pass = True
    selects_locally = True
    accumulates = True

    def __init__(self, engine, names: dict[int, str], config: BiDropConfig) -> None:
        self.params = [param for param in engine.module.parameters() if param.requires_grad]
        opt = engine.optimizer
        masters = {id(low): high for lows, highs in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
                   for low, high in zip(lows, highs)}
        self._masters = [masters.get(id(param), param).detach().view(-1) for param in self.params]
        self.fragments, offset = [], 0
        for param in self.params:
            name = names[id(param)]
            self.fragments.append(Fragment(name, 0, offset, param.numel(), config.is_eligible(name)))
            offset += param.numel()

    def begin_step(self) -> None:
        for param in self.params:
            param.grad = None

    def written(self) -> None:
        """Nothing: DeepSpeed's step reads p.grad as written."""

    def skipped(self) -> None:
        """Nothing: each pass is a boundary, and the next step starts with no gradient."""

    def views(self) -> list[torch.Tensor]:
        for param in self.params:
            if param.grad is None:  # a parameter this batch did not reach
                param.grad = torch.zeros_like(param)
        return [param.grad.view(-1) for param in self.params]

    def master_views(self) -> list[torch.Tensor]:
        return self._masters


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
        engine_device = torch.device(engine.device)
        comm = ProcessGroupCommunicator(data_parallel_group(engine), device=engine_device)
        # Under ZeRO-Offload the gradient partition is in host memory, and so are the statistics:
        # Bi-Drop then allocates nothing on the accelerator.
        device = torch.device("cpu") if getattr(partition, "offload", False) else engine_device
        super().__init__(partition, config, device, comm,
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
        super().begin_step()

    @contextmanager
    def micro_step(self, last_in_pass: bool, last_in_step: bool) -> Iterator[None]:
        """Mark DeepSpeed's accumulation boundary: every pass end where the stage reduces there,
        else only the step's final backward (which readies DeepSpeed's step)."""
        every_pass = self.partition.boundary_every_pass
        boundary = last_in_pass if every_pass else last_in_step
        self.engine.set_gradient_accumulation_boundary(boundary)
        if boundary and every_pass:
            getattr(self.partition, "begin_window", lambda: None)()
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
        views = [view for view in self.partition.views() if view.numel()]
        if self.engine.fp16_enabled():
            for view in views:  # a rare path: a plain loop is fine
                view.fill_(float("inf"))
            self.optimizer_step()
        else:
            zero_all(views)
            self.partition.skipped()
        self.drop_retained()

    def optimizer_step(self) -> None:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.optimizer.zero_grad()
        self.engine.set_gradient_accumulation_boundary(False)
