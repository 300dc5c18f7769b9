"""BiDrop on FSDP2 shards (fully_shard per layer and at the root), 2 real gloo ranks, in lockstep with an
independent reference replica (tests/reference.py: its own passes with the same dropout draws, the float64
oracle's update, its own optimizer): at every step the reduce-scattered shards Bi-Drop read equal the
reference's passes, the mask the oracle's and the fp32 sharded weights the reference's (SGD and AdamW, k = 2
and 3, 1 and 2 chunks, fp32 and bf16 mixed precision); the plugin holds only its statistics; HSDP-like
meshes are refused."""

from __future__ import annotations

import torch

from bidrop_ds import BiDrop, BiDropConfig
from tests.backends.zero_oracle import LR, MICRO, plugin_owned_bytes
from tests.distributed import run_distributed
from tests.models import random_batch, split_chunks, tiny_bert
from tests.reference import Reference, held_weights, lockstep, record_reads


def sharded_bert(bf16: bool = False) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = tiny_bert(seed=0)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy else {}
    for layer in model.bert.encoder.layer:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


# (bf16 mixed precision, optimizer, k, chunks), 4 steps each in lockstep with the reference. bf16 with
# SGD only: AdamW moves every element by ~lr whatever the gradient's size, so where a bf16 gradient's sign
# differs from the fp32 reference's on a near-zero gradient, the weights differ by ~2 lr (not a fault).
SCENARIOS = [(False, "sgd", 2, 1), (False, "adamw", 3, 2), (True, "sgd", 3, 2)]
STEPS = 4
# Lockstep bounds (tests/reference.py), fp32 / bf16 compute. fp32: reads equal the reference's passes and
# weights the reference's to rounding (per element, relative to its travel). A bf16 forward and backward give
# gradients ~1e-2 off the fp32 reference's, which an element that barely moves cannot be judged by: there the
# weights are compared relative to the largest travel of any element (`coarse_weight_error`). A lost,
# doubled or stale pass, or a lost update, reads ~1 either way.
READ_BOUND = {False: 1e-6, True: 0.1}
WEIGHT_BOUND = {False: 1e-4, True: 0.1}


def coarse_weight_error(reference: Reference, held: list[tuple[str, int, torch.Tensor]]) -> float:
    """Max |run - reference| over the held elements, relative to the largest travel of any element."""
    weights = reference.weights()
    scale = max(max(travel.max().item() for travel in reference.travel.values()), 1e-30)
    return max(((values.reshape(-1).double().cpu() - weights[name][start:start + values.numel()]).abs().max().item()
                for name, start, values in held if values.numel()), default=0.0) / scale


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR) if kind == "sgd" else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _scenarios(rank: int, world_size: int) -> list[dict]:
    rows = []
    for bf16, kind, k, chunks in SCENARIOS:
        model = sharded_bert(bf16)
        config = BiDropConfig(k=k, p=0.3, seed=5)
        reference = Reference(tiny_bert(seed=0), lambda params: _optimizer(kind, params), config)
        bidrop = BiDrop(model, _optimizer(kind, model.parameters()), config)
        for step in range(STEPS):
            batch = split_chunks(random_batch(1000 * rank + step, size=MICRO * chunks), chunks)
            with record_reads(bidrop) as reads:
                result = bidrop.step(batch)
            row = lockstep(reference, bidrop, reads, batch)
            if bf16:
                row["weight_err"] = coarse_weight_error(reference, held_weights(bidrop))
            del row["mask"]
            rows.append({"bf16": bf16, "optimizer": kind, "k": k, "chunks": chunks, "step": step,
                         "skipped": result.skipped, "reads": len(reads), "kept_fraction": result.kept_fraction,
                         "plugin_bytes": plugin_owned_bytes(bidrop), "eligible_held": bidrop.backend.held_numel,
                         **row})
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


def test_fsdp2_follows_the_reference_and_refuses_hsdp():
    for rows in run_distributed(_scenarios, world_size=2, timeout_s=600):
        *steps, hsdp = rows
        assert len(steps) == STEPS * len(SCENARIOS)
        for row in steps:
            assert not row["skipped"] and row["reads"] == row["k"], row
            assert row["read_err"] <= READ_BOUND[row["bf16"]] and row["weight_err"] <= WEIGHT_BOUND[row["bf16"]], row
            assert row["mask_hard_differs"] == 0 or row["bf16"], row
            assert abs(row["kept_fraction"] - row["kept"] / row["N"]) < 2e-4, row
            # the statistics only: 4 bytes per eligible element held (k = 2, fp32 gradients), else 8
            assert row["plugin_bytes"] <= (4 if row["k"] == 2 else 8) * row["eligible_held"] + 1024, row
        assert "HSDP" in hsdp["hsdp_error"], hsdp
