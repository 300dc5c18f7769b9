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
from bidrop_ds.core import LocalCommunicator
from tests.distributed import run_distributed
from tests.models import random_batch, split_chunks, tiny_bert
from tests.oracle import oracle_step

LR = 0.5
MICRO = 4


def ds_config(stage: int, bf16: bool, chunks: int, world: int, accumulate_fp32: bool = True) -> dict:
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
        config["data_types"] = {"grad_accum_dtype": "fp32" if accumulate_fp32 else "bf16"}
    return config


# stage -> [(bf16, fp32 accumulation)]: ZeRO-0/1 bf16 with fp32 accumulation are refused (DeepSpeed
# rejects the first, the second is its BF16_Optimizer); with bf16 accumulation the gradients that
# Bi-Drop reads and writes are bf16.
PRECISIONS = {0: [(False, True), (True, False)], 1: [(False, True), (True, False)], 2: [(False, True), (True, True)],
              3: [(False, True), (True, True)]}


def make_engine(stage: int, bf16: bool, chunks: int, seed: int = 0, accumulate_fp32: bool = True):
    import deepspeed

    model = tiny_bert(seed=seed)
    config = ds_config(stage, bf16, chunks, dist.get_world_size(), accumulate_fp32)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=config)
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

    read_dtypes = set()

    def recording_update(grad):
        pieces = [grad] if isinstance(grad, torch.Tensor) else grad
        read_dtypes.update(g.dtype for g in pieces)
        passes.append(torch.cat([g.reshape(-1).double() for g in pieces]))
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
    # The oracle sees every rank's eligible elements at once (a test-only gather), unless every
    # rank holds them all (ZeRO-0 replicates).
    replicated = isinstance(backend.selection_comm, LocalCommunicator)
    gather = (lambda t: t) if replicated else _gather_cat
    oracle = oracle_step([gather(g[eligible]) for g in passes], gather(before[eligible]).abs(), config.p,
                         rescale=config.rescale)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(eligible.sum()))
    start = 0 if replicated else sum(counts[:dist.get_rank()])
    mine = slice(start, start + int(eligible.sum()))
    expected = sum(passes) / len(passes)                    # ineligible: the mean
    expected[eligible] = oracle.update[mine]                # eligible: the masked mean
    moved = before.double() - LR * expected
    # With 16-bit accumulation the written gradient is rounded once to bf16 (relative 2^-8).
    rounding = 2.0 ** -8 if torch.bfloat16 in read_dtypes else 0.0
    rel = ((after.double() - moved).abs() - LR * rounding * expected.abs()).clamp_min(0)
    rel = (rel / (moved.abs() + 1e-3)).max().item()
    masked = torch.zeros(backend.numel, dtype=torch.bool)
    masked[eligible] = ~oracle.mask[mine]
    reference_err = (_reference_pass_error(passes, backend.partition.fragments, chunks, config)
                     if step == 0 and before.dtype == torch.float32 and not bidrop.backend.engine.bfloat16_enabled()
                     else 0.0)
    return {"skipped": result.skipped, "reference_err": reference_err, "kept_fraction": result.kept_fraction,
            "oracle_kept": int(oracle.mask.sum()), "oracle_n": oracle.n, "N": oracle.mask.numel(),
            "max_rel_err": rel, "masked_unchanged": bool(torch.equal(after[masked], before[masked])),
            "masked_count": int(masked.sum()), "valid": int(valid.sum()),
            "plugin_bytes": plugin_owned_bytes(bidrop), "owned_elements": backend.numel}


def plugin_owned_bytes(bidrop: BiDrop) -> int:
    """Bytes of tensor storage held by the plugin's own objects and by nothing of the engine's
    (DeepSpeed buffers the plugin only points at do not count)."""
    engine = bidrop.backend.engine
    foreign = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    foreign |= {p.grad.untyped_storage().data_ptr() for p in engine.module.parameters() if p.grad is not None}
    foreign |= {t.untyped_storage().data_ptr() for t in _tensors(vars(engine.optimizer), set())}
    seen, owned = set(), 0
    for tensor in _tensors(bidrop, set()):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in foreign and ptr not in seen:
            seen.add(ptr)
            owned += tensor.untyped_storage().nbytes()
    return owned


def _tensors(obj, visited: set) -> list[torch.Tensor]:
    """Tensors reachable from obj through containers and bidrop_ds objects (not into others)."""
    if id(obj) in visited:
        return []
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        items = obj
    elif type(obj).__module__.startswith("bidrop_ds"):
        items = vars(obj).values() if hasattr(obj, "__dict__") else []
    else:
        return []
    return [t for item in items for t in _tensors(item, visited)]


def _scenarios(rank: int, world_size: int, stages: list[int]) -> list[dict]:
    out = []
    for stage in stages:
        for bf16, accumulate_fp32 in PRECISIONS[stage]:
            for chunks in (1, 2):
                engine = make_engine(stage, bf16, chunks, accumulate_fp32=accumulate_fp32)
                config = BiDropConfig(k=2, p=0.3, seed=11)
                bidrop = BiDrop(engine, config=config)
                for step in range(2):
                    batch = random_batch(1000 * rank + step, size=MICRO * chunks)
                    row = _check_step_against_oracle(bidrop, split_chunks(batch, chunks), step, config)
                    out.append({"stage": stage, "bf16": bf16, "chunks": chunks, "step": step, **row})
                engine.destroy()
    return out


@pytest.mark.parametrize("stages", [[0, 1, 2, 3]])
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
            # The plugin's own memory: the two fp32 statistics buffers, 8 bytes per owned element.
            assert row["plugin_bytes"] <= 8 * row["owned_elements"] + 1024, label


def _poisoned_pass(rank: int, world_size: int, stages: list[int]) -> list[dict]:
    """A NaN loss in pass 2 on rank 1 only: both ranks skip, master weights stay bit for bit."""
    out = []
    for stage in stages:
        engine = make_engine(stage, bf16=False, chunks=1)
        bidrop = BiDrop(engine, config=BiDropConfig(k=2, p=0.3, seed=3))
        bidrop.step([random_batch(rank, size=MICRO)])
        before = bidrop.backend.partition.master()
        calls = {"n": 0}

        def loss_fn(model, batch):
            calls["n"] += 1
            loss = model(**batch).loss
            return loss * float("nan") if rank == 1 and calls["n"] == 2 else loss

        result = bidrop.step([random_batch(10 + rank, size=MICRO)], loss_fn=loss_fn)
        unchanged = bool(torch.equal(before, bidrop.backend.partition.master()))
        after_skip = bidrop.step([random_batch(20 + rank, size=MICRO)])
        out.append({"stage": stage, "skipped": result.skipped, "unchanged": unchanged,
                    "counted": bidrop.skipped_steps, "recovered": not after_skip.skipped})
        engine.destroy()
    return out


def test_non_finite_pass_on_one_rank_skips_everywhere():
    ranks = run_distributed(_poisoned_pass, world_size=2, timeout_s=600, stages=[0, 1, 2, 3])
    for rows in ranks:
        for row in rows:
            assert row["skipped"] and row["unchanged"] and row["counted"] == 1 and row["recovered"], row


def _refusals(rank: int, world_size: int) -> list[str]:
    import deepspeed

    messages = []
    for stage, extra in [(1, {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}),
                         (2, {"gradient_accumulation_steps": 2,
                                                                   "train_batch_size": MICRO * 2 * world_size})]:
        model = tiny_bert()
        config = {**ds_config(stage, False, 1, world_size), **extra}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          config=config)
        try:
            bidrop = BiDrop(engine, config=BiDropConfig())
            bidrop.step([random_batch(0, size=MICRO)])
            messages.append("no error")
        except (ValueError, NotImplementedError) as err:
            messages.append(str(err))
        engine.destroy()
    return messages


def test_unsupported_setups_fail_with_a_clear_error():
    messages = run_distributed(_refusals, world_size=2, timeout_s=600)[0]
    assert "BF16_Optimizer" in messages[0] and "grad_accum_dtype" in messages[0]
    assert "gradient_accumulation_steps=2" in messages[1] and "1 chunk(s)" in messages[1]
