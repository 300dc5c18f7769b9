"""BiDrop on DeepSpeed ZeRO partitions, 2 real gloo ranks: the masks and fp32 master updates equal
the float64 oracle computed from the same per-pass rank-averaged gradients, those gradients equal
a DDP reference, a non-finite pass on one rank skips the step everywhere."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.bidrop import derive_seed
from tests.distributed import run_distributed
from tests.models import random_batch, split_chunks, tiny_bert
from tests.oracle import oracle_step

LR = 0.5
MICRO = 4


def ds_config(stage: int, bf16: bool, chunks: int, world: int) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": chunks,
        "train_batch_size": MICRO * chunks * world,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def make_engine(stage: int, bf16: bool, chunks: int, seed: int = 0):
    import deepspeed

    model = tiny_bert(seed=seed)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=ds_config(stage, bf16, chunks, dist.get_world_size()))
    return engine


def _gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, tensor.cpu())
    return torch.cat(pieces)


def _reference_pass_error(passes: list[torch.Tensor], fragments, chunks: list[dict], config: BiDropConfig) -> float:
    """Max abs difference between the partitions read per pass at step 0 and the same slices of a
    DDP reference's rank-averaged gradients (same initial weights, same dropout seeds)."""
    reference = torch.nn.parallel.DistributedDataParallel(tiny_bert(seed=0))
    named = dict(reference.module.named_parameters())
    worst = 0.0
    for j, read in enumerate(passes):
        reference.zero_grad(set_to_none=True)
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(config.seed, 0, j, dist.get_rank()))
            for chunk in chunks:
                (reference(**chunk).loss / len(chunks)).backward()
        for frag in fragments:
            ref = named[frag.name].grad.reshape(-1)[frag.start:frag.start + frag.numel].double()
            worst = max(worst, (read[frag.offset:frag.offset + frag.numel] - ref).abs().max().item(), 0.0)
    return worst


def _check_step_against_oracle(bidrop: BiDrop, chunks: list[dict], step: int, config: BiDropConfig) -> dict:
    """Run one step, recording each pass's partition; compare with the oracle over all ranks."""
    backend = bidrop.backend
    passes = []
    update = bidrop.stats.update

    def recording_update(grad):
        passes.append(grad.double().clone())
        update(grad)

    bidrop.stats.update = recording_update
    before = backend.partition.master()
    result = bidrop.step(chunks)
    del bidrop.stats.update
    after = backend.partition.master()
    eligible = torch.zeros(backend.numel, dtype=torch.bool)
    valid = torch.zeros(backend.numel, dtype=torch.bool)
    for frag in backend.partition.fragments:
        valid[frag.offset:frag.offset + frag.numel] = True
        eligible[frag.offset:frag.offset + frag.numel] = frag.eligible
    # The oracle sees every rank's eligible elements at once (a test-only gather).
    all_passes = [_gather_cat(g[eligible]) for g in passes]
    oracle = oracle_step(all_passes, _gather_cat(before[eligible]).abs(), config.p, rescale=config.rescale)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(eligible.sum()))
    start = sum(counts[:dist.get_rank()])
    mine = slice(start, start + int(eligible.sum()))
    expected = sum(passes) / len(passes)                    # ineligible: the mean
    expected[eligible] = oracle.update[mine]                # eligible: the masked mean
    moved = before.double() - LR * expected
    rel = ((after.double() - moved).abs() / (moved.abs() + 1e-3)).max().item()
    masked = torch.zeros(backend.numel, dtype=torch.bool)
    masked[eligible] = ~oracle.mask[mine]
    reference_err = (_reference_pass_error(passes, backend.partition.fragments, chunks, config)
                     if step == 0 and before.dtype == torch.float32 and not bidrop.backend.engine.bfloat16_enabled()
                     else 0.0)
    return {"skipped": result.skipped, "reference_err": reference_err, "kept_fraction": result.kept_fraction,
            "oracle_kept": int(oracle.mask.sum()), "oracle_n": oracle.n, "N": oracle.mask.numel(),
            "max_rel_err": rel, "masked_unchanged": bool(torch.equal(after[masked], before[masked])),
            "masked_count": int(masked.sum()), "valid": int(valid.sum())}


def _scenarios(rank: int, world_size: int, stages: list[int]) -> list[dict]:
    out = []
    for stage in stages:
        for bf16 in (False, True):
            for chunks in (1, 2):
                engine = make_engine(stage, bf16, chunks)
                config = BiDropConfig(k=2, p=0.3, seed=11)
                bidrop = BiDrop(engine, config=config)
                for step in range(2):
                    batch = random_batch(1000 * rank + step, size=MICRO * chunks)
                    row = _check_step_against_oracle(bidrop, split_chunks(batch, chunks), step, config)
                    out.append({"stage": stage, "bf16": bf16, "chunks": chunks, "step": step, **row})
                engine.destroy()
    return out


@pytest.mark.parametrize("stages", [[3]])
def test_zero_matches_oracle(stages):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ranks = run_distributed(_scenarios, world_size=2, timeout_s=600, stages=stages)
    for rows in ranks:
        for row in rows:
            label = f"{row}"
            assert not row["skipped"], label
            assert row["max_rel_err"] <= 1e-5, label
            assert row["reference_err"] <= 1e-6, label
            assert row["masked_unchanged"] and row["masked_count"] > 0, label
            assert row["kept_fraction"] == row["oracle_kept"] / row["N"], label
            assert row["oracle_kept"] - row["oracle_n"] <= 2, label  # ties aside, n of N
