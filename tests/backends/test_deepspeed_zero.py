"""BiDrop on DeepSpeed ZeRO partitions, 2 real gloo ranks: the masks and fp32 master updates equal
the float64 oracle computed from the same per-pass rank-averaged gradients, those gradients equal
a DDP reference, a non-finite pass on one rank skips the step everywhere."""

from __future__ import annotations

import os

import pytest
import torch

from bidrop_ds import BiDrop, BiDropConfig
from tests.backends.zero_oracle import (LR, MICRO, assert_matches_oracle, check_step_against_oracle, ds_config,
                                        reference_pass_error,
                                        make_engine)
from tests.distributed import run_distributed
from tests.models import random_batch, split_chunks, tiny_bert

def _fp16_supported() -> bool:
    """DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels (AVX512-FP16/AMX)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# (stage, precision, fp32 accumulation, offload): ZeRO-0/1 bf16 with fp32 accumulation are refused
# (DeepSpeed rejects the first, the second is its BF16_Optimizer); with bf16 accumulation the
# gradients that Bi-Drop reads and writes are bf16. Offload: "optimizer" (host fp32 gradient
# partition) on ZeRO-1/2/3, "all" adds offload_param on ZeRO-3. fp16 runs where the CPU has it.
SCENARIOS = [(0, "fp32", True, None), (0, "bf16", False, None), (1, "fp32", True, None), (1, "bf16", False, None),
             (1, "fp16", True, None), (2, "fp32", True, None), (2, "bf16", True, None), (2, "fp16", True, None),
             (3, "fp32", True, None), (3, "bf16", True, None), (3, "fp16", True, None),
             (1, "fp32", True, "optimizer"), (1, "bf16", False, "optimizer"),
             (2, "fp32", True, "optimizer"), (2, "bf16", True, "optimizer"), (3, "fp32", True, "optimizer"),
             (3, "bf16", True, "all")]
if not _fp16_supported():
    SCENARIOS = [scenario for scenario in SCENARIOS if scenario[1] != "fp16"]
COMPARED_STEPS = 2  # per scenario; fp16 may first skip overflowing steps while its loss scale settles
# ZeRO-2 with only the classifier (the model's last parameters) eligible: rank 0's partition holds no
# eligible element, and still takes part in every collective and writes the mean of its passes
CLASSIFIER_ONLY = (2, "fp32", True, "classifier only")


def _scenarios(rank: int, world_size: int, stages: list[int]) -> list[dict]:
    out = []
    for stage, precision, accumulate_fp32, offload in SCENARIOS + [CLASSIFIER_ONLY]:
        if stage in stages:
            for chunks in (1, 2):
                only_classifier = offload == CLASSIFIER_ONLY[-1]
                engine = make_engine(stage, precision, chunks, accumulate_fp32=accumulate_fp32,
                                     offload=None if only_classifier else offload)
                config = BiDropConfig(k=2, p=0.3, seed=11, **({"include": (r"^classifier\.",)} if only_classifier else {}))
                bidrop = BiDrop(engine, config=config)
                compared = 0
                for step in range(COMPARED_STEPS + 3):
                    if compared == COMPARED_STEPS:
                        break
                    batch = split_chunks(random_batch(1000 * rank + step, size=MICRO * chunks), chunks)
                    row, passes = check_step_against_oracle(bidrop, batch, config)
                    compared += not row["skipped"]
                    if step == 0 and precision == "fp32" and not row["skipped"]:  # the reference: fp32, step 0
                        row["reference_err"] = reference_pass_error(passes, bidrop.backend.partition.fragments,
                                                                     batch, config)
                    out.append({"stage": stage, "precision": precision, "offload": offload, "chunks": chunks,
                                "step": step, "eligible_owned": bidrop.backend.numel, **row})
                engine.destroy()
    return out


@pytest.mark.parametrize("stages", [[0, 1], [2], [3]])
def test_zero_matches_oracle(stages):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ranks = run_distributed(_scenarios, world_size=2, timeout_s=600, stages=stages)
    for rows in ranks:
        compared = {}
        for row in rows:
            scenario = (row["stage"], row["precision"], row["offload"], row["chunks"])
            if row["skipped"]:  # only an fp16 overflow while the loss scale settles may skip
                assert row["precision"] == "fp16", row
                continue
            compared[scenario] = compared.get(scenario, 0) + 1
            assert_matches_oracle(row, bound=1e-5)
            assert row.get("reference_err", 0.0) <= 1e-6, row
            # pass 1 stays in DeepSpeed's own accumulators exactly on ZeRO-2 with fp32 ones, no offload
            zero2_fp32 = row["stage"] == 2 and row["precision"] == "fp32" and row["offload"] in (None, CLASSIFIER_ONLY[-1])
            assert row["retains"] == zero2_fp32, row
        expected = {(stage, precision, offload, chunks) for stage, precision, _, offload in SCENARIOS + [CLASSIFIER_ONLY]
                    if stage in stages for chunks in (1, 2)}
        assert compared == dict.fromkeys(expected, COMPARED_STEPS)
    if 2 in stages:
        owned = [{row["eligible_owned"] for row in rows if row["offload"] == CLASSIFIER_ONLY[-1]} for rows in ranks]
        assert owned[0] == {0} and owned[1] != {0}, owned


def _poisoned_pass(rank: int, world_size: int, setups: list[tuple[int, str | None]]) -> list[dict]:
    """A NaN loss in pass 2 on rank 1 only: both ranks skip, master weights stay bit for bit."""
    out = []
    for stage, offload in setups:
        engine = make_engine(stage, "fp32", chunks=1, offload=offload)
        config = BiDropConfig(k=2, p=0.3, seed=3)
        bidrop = BiDrop(engine, config=config)
        bidrop.step([random_batch(rank, size=MICRO)])
        before = bidrop.backend.master_snapshot()
        calls = {"n": 0}

        def loss_fn(model, batch):
            calls["n"] += 1
            loss = model(**batch).loss
            return loss * float("nan") if rank == 1 and calls["n"] == 2 else loss

        result = bidrop.step([random_batch(10 + rank, size=MICRO)], loss_fn=loss_fn)
        unchanged = bool(torch.equal(before, bidrop.backend.master_snapshot()))
        # the next step starts afresh: it matches the oracle (nothing of the skipped passes is left)
        after_skip, _ = check_step_against_oracle(bidrop, [random_batch(20 + rank, size=MICRO)], config)
        out.append({"stage": stage, "offload": offload, "skipped": result.skipped, "unchanged": unchanged,
                    "counted": bidrop.skipped_steps, "after_skip": after_skip})
        engine.destroy()
    return out


def test_non_finite_pass_on_one_rank_skips_everywhere():
    setups = [(0, None), (1, None), (2, None), (3, None), (1, "optimizer"), (2, "optimizer"), (3, "all")]
    ranks = run_distributed(_poisoned_pass, world_size=2, timeout_s=600, setups=setups)
    assert [(row["stage"], row["offload"]) for row in ranks[0]] == setups
    for rows in ranks:
        for row in rows:
            assert row["skipped"] and row["unchanged"] and row["counted"] == 1, row
            assert not row["after_skip"]["skipped"], row
            assert_matches_oracle(row["after_skip"], bound=1e-5)


def _refusals(rank: int, world_size: int) -> list[str]:
    import deepspeed

    messages = []
    for stage, extra, offload in [(1, {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}, None),
                                  (2, {"gradient_accumulation_steps": 2, "train_batch_size": MICRO * 2 * world_size},
                                   None)]:
        model = tiny_bert()
        config = {**ds_config(stage, "fp32", 1, world_size, offload=offload), **extra}
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
