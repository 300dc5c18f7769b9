"""The documented ZeRO options users set, on 2 real gloo ranks in one launch, several steps each
beside a reference replica (tests/reference.py; see test_deepspeed_zero.py): with each, at every
step the per-pass shards Bi-Drop reads equal the reference's passes, the written gradient equals
the float64 oracle's, the fp32 masters equal the reference's weights, and the model's weights
follow the masters (refused features: test_deepspeed_zero.py)."""

from __future__ import annotations

import os

import torch

from tests.backends.zero_oracle import assert_lockstep, lockstep_summary, lockstep
from tests.distributed import run_distributed

# (stages, precision, the zero_optimization keys set), options that go
# together in one engine (engines cost seconds each). The tiny BERT has 6,354 elements in 41
# parameters: bucket sizes of 500 make many buckets; round robin reorders the parameters of each
# rank's partition; ZeRO-3 keeps every parameter whole (persistent) unless
# stage3_param_persistence_threshold is 0, so its other options are run with it; sub_group_size
# 1000 makes 4 optimizer sub-groups. gradient_clipping (top level) runs in test_deepspeed_zero.py.
PARTITIONED = {"stage3_param_persistence_threshold": 0}
OPTIONS = [
    ((1, 2), "fp32", {"reduce_bucket_size": 500, "allgather_bucket_size": 500, "overlap_comm": True}),
    ((1, 2), "fp32", {"contiguous_gradients": False, "reduce_scatter": False, "allgather_partitions": False}),
    ((1, 2), "fp32", {"round_robin_gradients": True}),
    ((2,), "bf16", {"round_robin_gradients": True}),
    ((3,), "fp32", {**PARTITIONED, "sub_group_size": 1000, "stage3_prefetch_bucket_size": 500,
                    "stage3_max_live_parameters": 500}),
    ((3,), "fp32", {**PARTITIONED, "reduce_bucket_size": 500, "overlap_comm": True}),
]
# 2 chunks, 4 steps per engine, the engines alternating between k = 2 with SGD and k = 3 with AdamW
# (an option run on ZeRO-1 and ZeRO-2 gets one of each)
PASSES = [dict(k=2, optimizer="sgd"), dict(k=3, optimizer="adamw")]


def _runs() -> list[dict]:
    runs = []
    for stages, precision, options in OPTIONS:
        for stage in stages:
            runs.append(dict(PASSES[len(runs) % 2], stage=stage, precision=precision, chunks=2, steps=4,
                             options=options, label=f"zero{stage}-{precision}-{sorted(options)}"))
    return runs


def _weights_follow_masters(engine, backend) -> bool:
    """The model's weights (a ZeRO-3 rank's parameter partition) equal the fp32 masters rounded to
    their dtype, fragment by fragment."""
    params = dict(engine.module.named_parameters())
    for frag, master in zip(backend.partition.fragments, backend.partition.master_views()):
        param = params[frag.name]
        if backend.stage == 3:
            held = param.ds_tensor.reshape(-1)[:frag.numel]
        else:
            held = param.detach().reshape(-1)[frag.start:frag.start + frag.numel]
        if not torch.equal(held, master.to(held.dtype)):
            return False
    return True


def _option_runs(rank: int, world_size: int, runs: list[dict]) -> list[dict]:
    return [row for run in runs for row in lockstep(rank, world_size, after_step=_weights_follow_masters, **run)]


def test_every_documented_zero_option_matches_the_reference_at_every_step():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    runs = _runs()
    ranks = run_distributed(_option_runs, world_size=2, timeout_s=900, runs=runs)
    for rows in ranks:
        assert sorted({row["label"] for row in rows}) == sorted(run["label"] for run in runs)
        print(lockstep_summary(rows))
        assert_lockstep(rows)
        for row in rows:
            assert row["after_step"], row
