"""BiDrop on DeepSpeed ZeRO partitions, 2 real gloo ranks, several steps each beside a reference
replica (tests/reference.py) that computes its own passes and takes its own optimizer's steps: at
every step the per-pass gradients Bi-Drop reads equal the reference's, the written gradient equals
the float64 oracle's of those reads, and the fp32 masters equal the reference's weights; across a
skipped step (a NaN pass on one rank: both skip, the masters stay bit for bit) and a save + resume
into a fresh engine (bidrop_ds.checkpoint), in every supported setup. Bounds and their reasons:
BOUNDS in zero_oracle.py."""

from __future__ import annotations

import os

import pytest
import torch

from bidrop_ds import BiDrop, BiDropConfig
from tests.backends.zero_oracle import LR, MICRO, assert_lockstep, lockstep_summary, ds_config, lockstep_runs
from tests.distributed import run_distributed
from tests.models import random_batch, tiny_bert


def _fp16_supported() -> bool:
    """DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels (AVX512-FP16/AMX)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# (stage, precision, fp32 accumulation, offload): ZeRO-0/1 bf16 with fp32 accumulation are refused
# (DeepSpeed rejects the first, the second is its BF16_Optimizer); with bf16 accumulation the
# gradients that Bi-Drop reads and writes are bf16. Offload: "optimizer" (host fp32 gradient
# partition) on ZeRO-1/2/3, "all" adds offload_param on ZeRO-3. fp16 runs where the CPU has it.
SETUPS = [(0, "fp32", True, None), (0, "bf16", False, None), (1, "fp32", True, None), (1, "bf16", False, None),
          (1, "fp16", True, None), (2, "fp32", True, None), (2, "bf16", True, None), (2, "fp16", True, None),
          (3, "fp32", True, None), (3, "bf16", True, None), (3, "fp16", True, None),
          (1, "fp32", True, "optimizer"), (1, "bf16", False, "optimizer"),
          (2, "fp32", True, "optimizer"), (2, "bf16", True, "optimizer"), (3, "fp32", True, "optimizer"),
          (3, "bf16", True, "all")]
if not _fp16_supported():
    SETUPS = [setup for setup in SETUPS if setup[1] != "fp16"]
# ZeRO-2 with only the classifier (the model's last parameters) eligible: rank 0's partition holds no
# eligible element, and still takes part in every collective and writes the mean of its passes
CLASSIFIER_ONLY = (r"^classifier\.",)
# Two runs per setup, so that every setup runs both pass counts (k = 2: the pair path and, on
# ZeRO-2 with fp32 accumulators, pass 1 retained where it lives; k = 3: the Welford path), both
# optimizers (SGD; AdamW, whose state carries across steps) and both chunk counts, with an event
# in the middle: a NaN pass on rank 1 at step 2 (4 steps compared around it), or, on every stage
# and every offload variant (fp32, and bf16 where only bf16 offloads), a save after step 1 and a
# resume into a fresh engine (steps 2-3 compared after it; an engine costs seconds). The AdamW runs
# in fp32 also clip (gradient_clipping 1e-3, the update's norm is ~1e-2: every step is clipped; under
# offload DeepSpeed clips with the norms it recorded before Bi-Drop wrote the update).
RUNS = [dict(chunks=1, k=2, optimizer="sgd", steps=5, nan_at=2), dict(chunks=2, k=3, optimizer="adamw", steps=4)]
RESUMED = {(0, "fp32", None), (1, "fp32", None), (2, "fp32", None), (3, "fp32", None), (1, "fp32", "optimizer"),
           (2, "fp32", "optimizer"), (3, "fp32", "optimizer"), (3, "bf16", "all")}


def _runs(stages: list[int]) -> list[dict]:
    out = []
    for stage, precision, accumulate_fp32, offload in SETUPS + [(2, "fp32", True, "classifier only")]:
        if stage in stages:
            only_classifier = offload == "classifier only"
            for index, run in enumerate(RUNS):
                if index == 1 and (stage, precision, offload) in RESUMED:
                    run = dict(run, resume_after=1)
                if index == 1 and precision == "fp32":
                    run = dict(run, clipping=1e-3)
                out.append(dict(run, stage=stage, precision=precision, accumulate_fp32=accumulate_fp32,
                                offload=None if only_classifier else offload,
                                include=CLASSIFIER_ONLY if only_classifier else (),
                                label=f"zero{stage}-{precision}-{offload}-{'ab'[index]}"))
    return out


def _launch(rank: int, world_size: int, runs: list[dict], directory: str, refusals: bool) -> tuple[list, list]:
    """The runs in one launch, and (on one of them) the refusals."""
    return lockstep_runs(rank, world_size, runs, directory), _refusals(rank, world_size) if refusals else []


@pytest.mark.parametrize("stages", [[0, 1], [2], [3]])
def test_zero_matches_the_reference_at_every_step(stages, tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    runs = _runs(stages)
    ranks = run_distributed(_launch, world_size=2, timeout_s=900, runs=runs, directory=str(tmp_path),
                            refusals=stages == [0, 1])
    for rows, messages in ranks:
        assert sorted({row["label"] for row in rows}) == sorted(run["label"] for run in runs)
        print(lockstep_summary(rows))
        assert_lockstep(rows)
        for row in rows:
            if row["nan"] and row["precision"] != "fp16":
                assert row["skipped"] and row["skips_counted"] == 1, row
            if not row["skipped"] and not row["resumed"]:
                assert row["clipped"] == bool(row["clipping"]), row  # every step of a clipping run clips
                # pass 1 stays in DeepSpeed's own accumulators exactly on ZeRO-2 with fp32 ones, no offload, k = 2
                retains = (row["stage"], row["precision"], row["k"]) == (2, "fp32", 2) and row["offload"] in (
                    None, "classifier only")
                assert row["retains"] == retains, row
        assert sum(row["resumed"] for row in rows) == sum("resume_after" in run for run in runs)
    if 2 in stages:
        owned = [{row["eligible_owned"] for row in rows if "classifier" in row["label"]} for rows, _ in ranks]
        assert owned[0] == {0} and owned[1] != {0}, owned
    if stages == [0, 1]:
        messages = ranks[0][1]
        assert "BF16_Optimizer" in messages[0] and "grad_accum_dtype" in messages[0]
        assert "gradient_accumulation_steps=2" in messages[1] and "1 chunk(s)" in messages[1]


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
