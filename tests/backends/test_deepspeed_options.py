"""The documented ZeRO options users set, on 2 real gloo ranks in one launch: with each, the per-pass
shards Bi-Drop reads equal a DDP reference, the masked fp32 master update equals the float64
oracle's and the model's weights follow the masters (refused features: test_deepspeed_zero.py)."""

from __future__ import annotations

import os

import torch

from bidrop_ds import BiDrop, BiDropConfig
from tests.backends.zero_oracle import (LR, MICRO, assert_matches_oracle, check_step_against_oracle, ds_config,
                                        reference_pass_error)
from tests.distributed import run_distributed
from tests.models import random_batch, split_chunks, tiny_bert

CHUNKS = 2
# (stages, precision, the zero_optimization keys set), options that go together in one engine (engines cost
# seconds each). The tiny BERT has 6,354 elements in 41 parameters: bucket sizes of 500 make many buckets;
# round robin reorders the parameters of each rank's partition; ZeRO-3 keeps every parameter whole
# (persistent) unless stage3_param_persistence_threshold is 0, so its other options are run with it;
# sub_group_size 1000 makes 4 optimizer sub-groups.
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


def _weights_follow_masters(bidrop: BiDrop) -> bool:
    """The model's weights (a ZeRO-3 rank's parameter partition) equal the fp32 masters rounded to
    their dtype, fragment by fragment."""
    backend = bidrop.backend
    params = dict(backend.engine.module.named_parameters())
    for frag, master in zip(backend.partition.fragments, backend.partition.master_views()):
        param = params[frag.name]
        if backend.stage == 3:
            held = param.ds_tensor.reshape(-1)[:frag.numel]
        else:
            held = param.detach().reshape(-1)[frag.start:frag.start + frag.numel]
        if not torch.equal(held, master.to(held.dtype)):
            return False
    return True


def _option_scenarios(rank: int, world_size: int) -> list[dict]:
    import deepspeed

    rows = []
    for stages, precision, options in OPTIONS:
        for stage in stages:
            config = BiDropConfig(k=2, p=0.3, seed=7)
            ds = ds_config(stage, precision, CHUNKS, world_size)
            ds["zero_optimization"].update(options)
            model = tiny_bert(seed=0)
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                              config=ds)
            bidrop = BiDrop(engine, config=config)
            batch = split_chunks(random_batch(1000 * rank, size=MICRO * CHUNKS), CHUNKS)
            row, passes = check_step_against_oracle(bidrop, batch, config)
            if precision == "fp32":
                row["reference_err"] = reference_pass_error(passes, bidrop.backend.partition.fragments, batch, config)
            row["weights_follow_masters"] = _weights_follow_masters(bidrop)
            rows.append({"stage": stage, "precision": precision, "options": options, **row})
            engine.destroy()
    return rows


def test_every_documented_zero_option_matches_the_oracle():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ranks = run_distributed(_option_scenarios, world_size=2, timeout_s=600)
    for rows in ranks:
        assert len(rows) == sum(len(stages) for stages, _, _ in OPTIONS)
        for row in rows:
            assert_matches_oracle(row, bound=1e-5)
            assert row.get("reference_err", 0.0) <= 1e-6, row
            assert row["weights_follow_masters"], row
