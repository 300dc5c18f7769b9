"""Bi-Drop under Hugging Face accelerate: `bidrop_for(accelerator, model, optimizer, config)`.

Call it right after `accelerator.prepare(...)`, with what prepare returned:

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    bidrop = bidrop_for(accelerator, model, optimizer, config)
    for chunks in micro_batch_groups(loader, chunks_per_step(accelerator)):
        result = bidrop.step(chunks)     # k passes x chunks, mask, optimizer step, zeroed grads
        scheduler.step()                 # a no-op when DeepSpeed owns the scheduler (engine.step() steps it)

The loader's batch size is the micro batch: a Bi-Drop step takes `chunks` consecutive micro-batches.
A torch LR scheduler passed to prepare() becomes an AcceleratedScheduler (under DeepSpeed too, which
only owns schedulers of its own kind); by default (`step_scheduler_with_optimizer=True`) each of its
`step()` calls advances the schedule `num_processes` times, accelerate's convention for schedules
sized in single-process steps. `Accelerator(step_scheduler_with_optimizer=False)` makes it one
advance per call, i.e. per Bi-Drop step (what launch/accelerate_finetune.py does).

What it hands to `BiDrop`, by accelerate setup:

- DeepSpeed plugin (ZeRO 0-3): `BiDrop(engine, config=config)`; the engine is the prepared model
  (the engine's module is accepted too). Bi-Drop drives the engine itself, `engine.backward` per chunk
  and one `engine.step()` per Bi-Drop step. Do not call `accelerator.backward` for the passes:
  accelerate's DeepSpeed wrapper calls `engine.step()` inside it whenever gradients sync, i.e. after
  the first pass. The prepared optimizer (a `DeepSpeedOptimizerWrapper`, whose step and zero_grad
  are no-ops) is not used. The engine's `gradient_accumulation_steps` (the yaml's
  `gradient_accumulation_steps`) is the number of chunks per Bi-Drop step. What the DeepSpeed backend
  refuses (offload, ZeRO++, pipeline, ...) it refuses here too, with its own error.
- FSDP2 (`fsdp_version: 2`), DDP (MULTI_GPU, MULTI_CPU, ...) or one process:
  `BiDrop(prepared_model, inner_optimizer, config)`: accelerate wraps the optimizer in an
  `AcceleratedOptimizer`, and Bi-Drop gets the torch optimizer inside it. Bi-Drop writes the final
  gradient itself and must step exactly once per Bi-Drop step. The wrapper's `step()` equals the
  inner `step()` only outside `accelerator.accumulate()` (inside, `sync_gradients` is false on
  non-boundary batches and the wrapper skips the step) and without a GradScaler (with one it
  unscales, checks for infs and steps through the scaler); the inner optimizer keeps Bi-Drop
  independent of that state. Under FSDP2 the inner optimizer holds the sharded (DTensor) parameters
  accelerate swapped in during prepare(), which is what Bi-Drop's FSDP2 backend works on.

Refused with a `ValueError` naming the setting and the way out:
- fp16 through accelerate's GradScaler (`mixed_precision="fp16"` without DeepSpeed): the k passes
  run plain `loss.backward()`, unscaled, so the scaler would unscale gradients that were never
  scaled. Use bf16, or DeepSpeed's fp16 (ZeRO-1/2/3: the loss scale is read from DeepSpeed), or the
  hooks (`begin_step` / `fold_pass` / `apply_mask(grad_scale=scaler.get_scale())`) in a loop of
  your own.
- FSDP1 (`fsdp_version: 1`), torch.compile through accelerate (`dynamo_backend`), XLA, Megatron-LM,
  tensor / context / sequence parallelism (`parallelism_config`), an unprepared model in a
  distributed run, an optimizer that holds none of the model's parameters.
Do not wrap `bidrop.step` in `accelerator.accumulate()`: the chunks of a Bi-Drop step are its
gradient accumulation.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from bidrop_ds.backends.deepspeed_zero import is_deepspeed_engine
from bidrop_ds.backends.fsdp2 import is_fsdp2_model
from bidrop_ds.bidrop import BiDrop
from bidrop_ds.config import BiDropConfig

logger = logging.getLogger(__name__)

__all__ = ["bidrop_for", "chunks_per_step", "micro_batch_groups"]


def bidrop_for(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
               config: BiDropConfig | None = None) -> BiDrop:
    """A `BiDrop` for a model (and optimizer) that `accelerator.prepare` returned; see the module doc."""
    from accelerate.utils import DistributedType

    config = config if config is not None else BiDropConfig()
    kind = accelerator.distributed_type
    _refuse_common(accelerator, model, kind, DistributedType)
    if kind == DistributedType.DEEPSPEED or is_deepspeed_engine(model):
        engine = _deepspeed_engine(accelerator, model)
        if optimizer is not None and getattr(optimizer, "optimizer", optimizer) is not engine.optimizer:
            raise ValueError("bidrop_for: under DeepSpeed the optimizer must be the one accelerator.prepare "
                             "returned with this model (or None); the engine brings its own")
        if accelerator.gradient_accumulation_steps != engine.gradient_accumulation_steps():
            raise ValueError(f"bidrop_for: accelerate has gradient_accumulation_steps="
                             f"{accelerator.gradient_accumulation_steps} but the DeepSpeed engine "
                             f"{engine.gradient_accumulation_steps()}; set one value (the chunks per Bi-Drop step)")
        return BiDrop(engine, config=config)
    if optimizer is None:
        raise ValueError("bidrop_for: pass the optimizer that accelerator.prepare returned with the model")
    if getattr(accelerator, "scaler", None) is not None:
        raise ValueError(
            f"bidrop_for: mixed_precision={accelerator.mixed_precision!r} through accelerate's "
            f"{type(accelerator.scaler).__name__} is not supported: Bi-Drop's passes call loss.backward() "
            "unscaled, and the scaler would unscale them. Use mixed_precision='bf16' (or 'no'), DeepSpeed's "
            "fp16 (ZeRO-1/2/3), or drive BiDrop's hooks in a loop of your own (scaled backward per pass, "
            "fold_pass(), apply_mask(grad_scale=scaler.get_scale()), then the scaler's step and update)")
    if is_fsdp2_model(model):
        _warn_fsdp2_reduce_dtype(accelerator)
    elif kind == DistributedType.FSDP:
        raise ValueError(f"bidrop_for: FSDP version 1 ({type(model).__name__}) is not supported; set "
                         "fsdp_version: 2 in the accelerate config (Bi-Drop works on FSDP2's DTensor shards)")
    elif accelerator.num_processes > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(f"bidrop_for: {accelerator.num_processes} processes ({kind}) but the model is a "
                         f"{type(model).__name__}, not DistributedDataParallel or FSDP2; pass the model that "
                         "accelerator.prepare returned")
    inner = _inner_optimizer(optimizer)
    _check_optimizer_holds(model, inner)
    return BiDrop(model, inner, config)


def chunks_per_step(accelerator) -> int:
    """Micro-batches per Bi-Drop step: accelerate's gradient_accumulation_steps. Under DeepSpeed that
    is the engine's (the yaml's `gradient_accumulation_steps`), which must equal the chunk count;
    elsewhere it is 1 unless set (`Accelerator(gradient_accumulation_steps=N)` or the environment
    variable ACCELERATE_GRADIENT_ACCUMULATION_STEPS; `accelerate launch --gradient_accumulation_steps`
    only reaches DeepSpeed runs)."""
    return int(accelerator.gradient_accumulation_steps)


def micro_batch_groups(loader: Iterable[Any], chunks: int, limit: int | None = None) -> Iterator[list[Any]]:
    """Consecutive micro-batches of `loader` in lists of `chunks`: the chunks of one Bi-Drop step.

    An incomplete last group is dropped. `limit` caps the number of micro-batches read (e.g. the same
    count on every rank).
    """
    if chunks < 1:
        raise ValueError(f"micro_batch_groups: chunks must be >= 1, got {chunks}")
    batches = iter(loader) if limit is None else itertools.islice(loader, limit)
    while True:
        group = list(itertools.islice(batches, chunks))
        if len(group) < chunks:
            return
        yield group


# ----- internals -------------------------------------------------------------------------------------
def _refuse_common(accelerator, model: nn.Module, kind, DistributedType) -> None:
    if kind in (DistributedType.XLA, DistributedType.MEGATRON_LM):
        raise ValueError(f"bidrop_for: accelerate's {kind} setup is not supported (Bi-Drop has backends for "
                         "DeepSpeed ZeRO 0-3, FSDP2, DDP and a single process)")
    parallel = getattr(accelerator, "parallelism_config", None)
    if parallel is not None:
        sizes = {name: int(getattr(parallel, name, 1) or 1) for name in ("tp_size", "cp_size", "sp_size")}
        used = {name: size for name, size in sizes.items() if size > 1}
        if used:
            raise ValueError(f"bidrop_for: parallelism_config with {used} is not supported; Bi-Drop supports "
                             "data parallelism (DDP, FSDP2 on a 1-D mesh, DeepSpeed ZeRO) only")
    from accelerate.utils import is_compiled_module

    if is_compiled_module(model):
        raise ValueError("bidrop_for: a torch.compile'd model (accelerate's dynamo_backend) is not supported: "
                         "Bi-Drop needs the DDP / FSDP2 / DeepSpeed module itself. Launch with dynamo_backend "
                         "'no' (compile submodules yourself before prepare if you need it)")


def _deepspeed_engine(accelerator, model: nn.Module):
    if is_deepspeed_engine(model):
        return model
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    engine = getattr(wrapped, "engine", None)
    if engine is not None and model is engine.module:
        return engine
    raise ValueError(f"bidrop_for: under accelerate's DeepSpeed plugin pass the model that accelerator.prepare "
                     f"returned (a DeepSpeedEngine), not a {type(model).__name__}; prepare the model together "
                     "with its optimizer and a dataloader")


def _inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _check_optimizer_holds(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """accelerate's own advice for an optimizer that holds none of the model's trainable parameters
    (BiDrop itself refuses one that misses any, naming it)."""
    held = {id(param) for group in optimizer.param_groups for param in group["params"]}
    trainable = [param for param in model.parameters() if param.requires_grad]
    if trainable and not any(id(param) in held for param in trainable):
        raise ValueError("bidrop_for: the optimizer holds none of the model's trainable parameters; prepare the "
                         "model and its optimizer in the same accelerator.prepare call (under FSDP2 accelerate "
                         "swaps the sharded parameters into the optimizer there)")


def _warn_fsdp2_reduce_dtype(accelerator) -> None:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    reduce_dtype = getattr(policy, "reduce_dtype", None)
    if reduce_dtype not in (None, torch.float32):
        logger.warning(
            "bidrop_for: FSDP2 reduces gradients in %s (accelerate's mixed_precision policy); Bi-Drop's statistics "
            "then see rounded gradients. For fp32 reduction pass FullyShardedDataParallelPlugin(fsdp_version=2, "
            "mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)) "
            "to Accelerator", reduce_dtype)
