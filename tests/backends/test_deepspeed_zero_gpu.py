"""BiDrop on DeepSpeed ZeRO-2/3 on one CUDA GPU (one rank, nccl), bf16 and fp16 with fp32 gradient
accumulation: the fp32 master update of each step equals LR x the float64 oracle's update from the
passes the plugin read (fp16: divided by DeepSpeed's loss scale), masked elements stay bit for bit,
and an inf pass under fp16 takes DeepSpeed's overflow path (the loss scale backs off, the masters
stay bit for bit). Skipped without a CUDA GPU; launch/gpu_check.sh runs it on the device machine,
and `-s` shows the Markdown tables it prints."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from bidrop_ds import BiDrop, BiDropConfig
from tests.backends.zero_oracle import MICRO, assert_matches_oracle, check_step_against_oracle, make_engine
from tests.distributed import _free_port
from tests.models import random_batch, split_chunks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (launch/gpu_check.sh runs it on the device machine)")

# Every scenario accumulates in fp32, so the bound is the CPU test's: the plugin's fp32 Welford mean
# and DeepSpeed's fp32 SGD step against float64 (the fp16 unscale by a power of two is exact).
BOUND = 1e-5
MAX_STEPS = 4   # fp16 starts at scale 2^16, so its first steps may overflow and be skipped
COMPARED = 2    # a scenario stops after this many compared steps
SCENARIOS = [(stage, precision, chunks) for stage in (2, 3) for precision in ("bf16", "fp16") for chunks in (1, 2)]
# ZeRO-2 fp32: pass 1 stays in DeepSpeed's own accumulators on the GPU (the plugin allocates nothing)
SCENARIOS += [(2, "fp32", chunks) for chunks in (1, 2)]


@pytest.fixture(scope="module", autouse=True)
def one_rank_on_gpu() -> Iterator[None]:
    """World size 1 on GPU 0: the env:// variables DeepSpeed's init_distributed reads, then nccl."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl")
    yield
    dist.destroy_process_group()


def _batch(seed: int, chunks: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """A batch of MICRO x chunks samples split into chunks, on the engine's device."""
    batch = split_chunks(random_batch(seed, size=MICRO * chunks), chunks)
    return [{key: value.to(device) for key, value in chunk.items()} for chunk in batch]


def _markdown(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `columns` (floats as %g)."""
    def cell(value: object) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows])


def _scenario(stage: int, precision: str, chunks: int) -> tuple[dict, list[dict]]:
    """Steps until COMPARED were compared (at most MAX_STEPS): a table row and the compared rows."""
    engine = make_engine(stage, precision, chunks)
    config = BiDropConfig(k=2, p=0.3, seed=11)
    bidrop = BiDrop(engine, config=config)
    rows = []
    for step in range(MAX_STEPS):
        rows.append(check_step_against_oracle(bidrop, _batch(step, chunks, engine.device), config)[0])
        if sum(not row["skipped"] for row in rows) == COMPARED:
            break
    scale = engine.optimizer.loss_scale if precision == "fp16" else 1.0
    engine.destroy()
    compared = [row for row in rows if not row["skipped"]]
    table = {"stage": stage, "dtype": precision, "chunks": chunks, "steps": len(rows),
             "kept fraction": ", ".join(f"{row['kept_fraction']:.6f}" for row in compared),
             "n/N": ", ".join(f"{row['oracle_n']}/{row['N']} = {row['oracle_n'] / row['N']:.6f}" for row in compared),
             "max rel err": f"{max((row['max_rel_err'] for row in compared), default=float('nan')):.2e}",
             "masked unchanged": "yes" if compared and all(row["masked_unchanged"] for row in compared) else "no",
             "skipped (Bi-Drop/DeepSpeed)": f"{sum(row['bidrop_skipped'] for row in rows)}/"
                                            f"{sum(row['ds_skipped'] for row in rows)}",
             "loss scale (end)": float(scale), "bound": BOUND}
    return table, compared


def test_bf16_and_fp16_zero_match_oracle_on_gpu():
    results = [_scenario(*scenario) for scenario in SCENARIOS]
    print("\n" + _markdown([table for table, _ in results], list(results[0][0])))
    for table, compared in results:
        assert compared, f"no step was compared (all skipped): {table}"
        for row in compared:
            assert_matches_oracle(row, BOUND)
            assert row["retains"] == (table["stage"] == 2 and table["dtype"] == "fp32"), table


def _poisoned(stage: int) -> dict:
    """fp16, pass 2 of a step returns an inf loss: Bi-Drop and DeepSpeed skip that step, the loss
    scale backs off, the fp32 masters stay bit for bit, and one of the next 3 steps is taken (the
    inf written for DeepSpeed's overflow check does not stay in its buffers)."""
    engine = make_engine(stage, "fp16", chunks=1)
    bidrop = BiDrop(engine, config=BiDropConfig(k=2, p=0.3, seed=3))
    calls = 0

    def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = model(**batch).loss
        return loss * float("inf") if calls == 2 else loss

    scale, before = engine.optimizer.loss_scale, bidrop.backend.master_snapshot().cpu()
    result = bidrop.step(_batch(0, 1, engine.device), loss_fn=loss_fn)
    row = {"stage": stage, "dtype": "fp16", "skipped": result.skipped, "Bi-Drop skipped": bidrop.skipped_steps,
           "DeepSpeed skipped": engine.skipped_steps, "loss scale before": scale,
           "loss scale after": engine.optimizer.loss_scale,
           "masters bit-identical": torch.equal(before, bidrop.backend.master_snapshot().cpu()),
           "recovered": any(not bidrop.step(_batch(1 + i, 1, engine.device)).skipped for i in range(3))}
    engine.destroy()
    return row


def test_fp16_inf_pass_backs_off_the_loss_scale_and_keeps_the_masters():
    rows = [_poisoned(stage) for stage in (2, 3)]
    print("\n" + _markdown(rows, list(rows[0])))
    for row in rows:
        assert row["skipped"] and row["Bi-Drop skipped"] == 1 and row["DeepSpeed skipped"] == 1, row
        assert row["loss scale after"] < row["loss scale before"], row
        assert row["masters bit-identical"] and row["recovered"], row
