"""A recipe's DeepSpeed JSON config: filled for the run's global batch, checked, and its optional
"bidrop" section layered under the Bi-Drop flags.

Every check raises ValueError with one line naming the file, the numbers and the fix; a recipe turns
it into `PROG: error: ...` on every rank alike, before any process group exists.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Mapping

from bidrop_ds.config import BiDropConfig

DS_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def deepspeed_batch_config(ds_config: Mapping[str, Any], batch_size: int, chunks: int, world: int,
                           source: str = "the DeepSpeed config") -> dict[str, Any]:
    """A copy of `ds_config` with its batch fields set for a global batch of `batch_size` on `world`
    ranks in `chunks` chunks: micro batch = batch_size / (world x chunks), gradient_accumulation_steps
    = chunks (what the Bi-Drop backend requires), train_batch_size = batch_size. Fields given as
    numbers must already agree; a mismatch or a batch that does not split evenly raises ValueError
    naming the numbers and the fix."""
    per_step = world * chunks
    if batch_size % per_step:
        lower = batch_size // per_step * per_step
        options = " or ".join(f"--batch_size {b}" for b in (lower, lower + per_step) if b > 0)
        raise ValueError(
            f"--batch_size {batch_size} is the global batch and must split evenly into {world} rank(s) x "
            f"{chunks} chunk(s) = {per_step} equal micro-batches, but {batch_size} is not a multiple of "
            f"{per_step}. Use {options}, or change --chunks.")
    micro = batch_size // per_step
    wanted = dict(zip(DS_BATCH_KEYS, (micro, chunks, batch_size)))
    clashes = [f"{key}={ds_config[key]!r} (this run needs {value})" for key, value in wanted.items()
               if key in ds_config and ds_config[key] != "auto" and ds_config[key] != value]
    if clashes:
        raise ValueError(
            f"{source}: {', '.join(clashes)} contradicts --batch_size {batch_size} (global) on {world} rank(s) "
            f"with --chunks {chunks}: micro batch {micro} x {chunks} chunk(s) x {world} rank(s), and a Bi-Drop "
            f"step needs gradient_accumulation_steps = --chunks. Set these fields to \"auto\" (or to the "
            f"values above), or change --batch_size / --chunks.")
    return {**ds_config, **wanted}


def load_deepspeed_config(path: str, batch_size: int, chunks: int, world: int,
                          program: str = "finetune.py") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(DeepSpeed config ready for `deepspeed.initialize`, its "bidrop" object or None).

    The "bidrop" object (BiDropConfig keys) is removed before DeepSpeed sees the config; the batch
    fields are filled (`deepspeed_batch_config`); "zero_allow_untested_optimizer" is set because the
    client torch AdamW is passed (DeepSpeed's own CPU Adam needs compiled ops). `program` names the
    recipe that brings its own optimizer and schedule in the error for a config that has them."""
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object, not {type(config).__name__}")
    section = config.pop("bidrop", None)
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{path}: \"bidrop\" must be an object of BiDropConfig keys (k, p, score, ...), "
                         f"not {type(section).__name__}")
    owned = [key for key in ("optimizer", "scheduler") if key in config]
    if owned:
        raise ValueError(f"{path}: remove the {' and '.join(repr(k) for k in owned)} section(s): {program} "
                         "passes DeepSpeed its own AdamW (--lr, --weight_decay) and linear warm-up schedule "
                         "(--warmup_ratio)")
    config = deepspeed_batch_config(config, batch_size, chunks, world, source=path)
    config["zero_allow_untested_optimizer"] = True
    return config, section


def offloads_optimizer(ds_config: Mapping[str, Any] | None) -> bool:
    """Whether `ds_config` (None: no DeepSpeed) keeps the optimizer in host memory (ZeRO-Offload)."""
    offload = (ds_config or {}).get("zero_optimization", {}).get("offload_optimizer", {})
    return offload.get("device", "none") == "cpu"


def resolve_bidrop_config(args: argparse.Namespace, base: Mapping[str, Any] | None = None,
                          source: str = "the DeepSpeed config") -> BiDropConfig:
    """`BiDropConfig.from_args(args)` on top of `base` (the DeepSpeed config's "bidrop" object):
    keys of the --bidrop_config file override `base`, flags given on the command line override both."""
    if not base:
        return BiDropConfig.from_args(args)
    try:
        BiDropConfig.from_dict(base)
    except ValueError as err:
        raise ValueError(f"{source}: \"bidrop\": {err}") from None
    file_keys: set[str] = set()
    if getattr(args, "bidrop_config", None):
        with open(args.bidrop_config, encoding="utf-8") as handle:
            raw = json.load(handle)
        file_keys = set(raw) if isinstance(raw, dict) else set()  # from_args reports a bad file
    layered = argparse.Namespace(**vars(args))
    for key, value in base.items():
        if key not in file_keys and getattr(args, key, None) is None:
            setattr(layered, key, value)  # as if given as a flag, below the file and the real flags
    return BiDropConfig.from_args(layered)
