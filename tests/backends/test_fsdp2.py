"""BiDrop on FSDP2 shards (fully_shard per layer and at the root), 2 real gloo ranks: the mask and
the fp32 update equal the float64 oracle from the same per-pass reduce-scattered shards, those
shards equal a DDP reference, bf16 mixed precision runs, HSDP-like meshes are refused."""

from __future__ import annotations

import torch

from bidrop_ds import BiDrop, BiDropConfig
from tests.backends.zero_oracle import LR, MICRO, assert_matches_oracle, check_step_against_oracle, reference_pass_error
from tests.distributed import run_distributed
from tests.models import random_batch, split_chunks, tiny_bert


def sharded_bert(bf16: bool = False) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = tiny_bert(seed=0)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy else {}
    for layer in model.bert.encoder.layer:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _scenarios(rank: int, world_size: int) -> list[dict]:
    rows = []
    for bf16 in (False, True):
        for chunks in (1, 2):
            model = sharded_bert(bf16)
            config = BiDropConfig(k=2, p=0.3, seed=5)
            bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=LR), config)
            for step in range(2):
                batch = split_chunks(random_batch(1000 * rank + step, size=MICRO * chunks), chunks)
                row, passes = check_step_against_oracle(bidrop, batch, config)
                if step == 0 and not bf16:
                    row["reference_err"] = reference_pass_error(passes, bidrop.backend.partition.fragments, batch, config)
                rows.append({"bf16": bf16, "chunks": chunks, "step": step, **row})
    try:  # a 2-D mesh (HSDP-like) is refused with a clear error
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard"))
        model = fully_shard(tiny_bert(seed=0), mesh=mesh)
        BiDrop(model, torch.optim.SGD(model.parameters(), lr=LR), BiDropConfig())
        rows.append({"hsdp_error": "none"})
    except ValueError as err:
        rows.append({"hsdp_error": str(err)})
    return rows


def test_fsdp2_matches_oracle_and_refuses_hsdp():
    for rows in run_distributed(_scenarios, world_size=2, timeout_s=600):
        *steps, hsdp = rows
        assert len(steps) == 8
        for row in steps:
            assert_matches_oracle(row, bound=1e-5)
            assert row.get("reference_err", 0.0) <= 1e-6, row
        assert "HSDP" in hsdp["hsdp_error"], hsdp
