"""launch/finetune.py on 2 real DeepSpeed ranks (torchrun, gloo, CPU), on a tiny config-built BERT and
small VADER files (no network), plus the batch arithmetic and config layering in one process.

Each launch costs ~15 s on 2 cores (the first one on a machine also JIT-compiles DeepSpeed's shm op,
~25 s, unless TORCH_EXTENSIONS_DIR points at a cache; it is passed through from the environment)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

import pytest
import torch
from transformers import BertForSequenceClassification

from tests.launch.conftest import ROOT, SCRIPT, small_run
from tests.launching import run_in_session

pytest.importorskip("deepspeed")

EVAL_SIZE = "33"  # odd: the ranks hold 17 and 16 examples, so one rank pads with a dummy batch


RECIPE = ["-m", "bidrop_ds.recipes.finetune"]  # what the installed recipe runs under a launcher


def launch(*args: str, timeout: float = 180, target: Sequence[str] = (str(SCRIPT),)) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 launch/finetune.py ARGS` on CPU (a free port each time);
    `target` RECIPE: the installed module instead of the script."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target, *args]
    return run_in_session(command, env, timeout, "the 2-rank run")


def run_ok(tmp_path: Path, *args: str, timeout: float = 180, target: Sequence[str] = (str(SCRIPT),)) -> dict:
    """Launch, require a clean exit of both ranks, return the summary rank 0 wrote."""
    out = tmp_path / "summary.json"
    done = launch(*args, "--output_json", str(out), timeout=timeout, target=target)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "terminate called" not in done.stderr
    summary = json.loads(out.read_text())
    assert f"ranks=2 zero_stage={summary['zero_stage']} dtype={summary['dtype']}" in done.stdout
    assert done.stdout.count("done: vader-movie") == 1  # rank 0 alone reports
    return summary


def check_summary(summary: dict, stage: int, dtype: str, p: float) -> None:
    assert (summary["ranks"], summary["zero_stage"], summary["dtype"]) == (2, stage, dtype)
    assert (summary["micro_batch"], summary["gradient_accumulation_steps"]) == (4, 2)  # 16 / (2 ranks x 2 chunks)
    assert summary["eval_size"] == summary["eval_examples"] == int(EVAL_SIZE)  # each held-out example once
    assert summary["steps"] == 64 // 16 and summary["skipped_steps"] == 0
    assert summary["lr_scheduler_steps"] == summary["steps"]  # stepped by engine.step(), once per Bi-Drop step
    assert summary["final_lr"] == 0.0
    assert math.isfinite(summary["train_loss_last_epoch"]) and math.isfinite(summary["eval_loss"])
    assert summary["mean_kept_fraction"] == pytest.approx(p, abs=0.01)
    owned = summary["eligible_owned_elements_per_rank"]
    assert len(owned) == 2 and all(n > 0 for n in owned)
    # k = 2 with fp32 gradients (fp32, or bf16 accumulated in fp32): pass 1 of the eligible elements,
    # except on ZeRO-2 with fp32 accumulators, where pass 1 stays in DeepSpeed's own (no buffer)
    retained = stage == 2 and dtype == "fp32"
    assert summary["pass1_in_engine_buffer"] == retained
    assert summary["plugin_bytes_per_rank"] == [0 if retained else 4 * n for n in owned]


def test_zero2_fp32_trains_on_two_ranks(tiny_model: Path, vader_cache: Path, tmp_path: Path) -> None:
    """Also with a dev split (--dev_size, odd like EVAL_SIZE): its per-epoch evaluation runs on both ranks
    and its row, gathered to rank 0, holds every dev and held-out example once."""
    summary = run_ok(tmp_path, "--deepspeed", str(ROOT / "ds_configs" / "zero2_fp32.json"),
                     *small_run(tiny_model, "--chunks", "2", "--eval_size", EVAL_SIZE, "--dev_size", "9"))
    check_summary(summary, stage=2, dtype="fp32", p=0.3)
    (row,) = summary["epoch_history"]
    assert (row["epoch"], row["dev_eval_examples"], row["eval_examples"], summary["best_dev_epoch"]) == (1, 9, 33, 1)
    assert (summary["accuracy"], summary["eval_loss"]) == (row["accuracy"], row["eval_loss"])


def test_zero3_fp32_held_out_metrics_equal_one_process(finetune: ModuleType, tiny_model: Path, vader_cache: Path,
                                                       tmp_path: Path) -> None:
    """With lr 0 the weights stay the initial ones on both paths, so the 2-rank evaluation (sharded, padded,
    gathered) must give the single-process numbers. The head is scaled up so that per-example losses
    differ and a missing or doubled example would show in the mean. ZeRO-3 is told to partition every
    parameter and re-gather it in every forward (a model this small would otherwise stay gathered after
    the first one), so a rank skipping the padding forward would break the run (collective mismatch)."""
    config = json.loads((ROOT / "ds_configs" / "zero3_fp32.json").read_text())
    config["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0,
                                       stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    shutil.copytree(tiny_model, tmp_path / "model")
    model = BertForSequenceClassification.from_pretrained(tiny_model)
    with torch.no_grad():
        model.classifier.weight.mul_(300.0)
    model.save_pretrained(tmp_path / "model")
    args = small_run(tmp_path / "model", "--chunks", "2", "--eval_size", EVAL_SIZE, "--lr", "0")
    summary = run_ok(tmp_path, "--deepspeed", str(tmp_path / "zero3.json"), *args)
    check_summary(summary, stage=3, dtype="fp32", p=0.3)
    single = finetune.main(args)
    assert single["eval_examples"] == summary["eval_examples"]
    assert summary["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert summary["accuracy"] == single["accuracy"]


def test_zero3_held_out_at_end_restores_the_best_dev_partitions(tiny_model: Path, vader_cache: Path,
                                                                tmp_path: Path) -> None:
    """--held_out_at end on ZeRO-3: the host copy holds each rank's partitions and the gathered
    persistent parameters (a threshold of 2,000 elements keeps the norms and biases gathered, the
    matrices partitioned), and restoring it gives the numbers evaluating during training gave."""
    config = json.loads((ROOT / "ds_configs" / "zero3_fp32.json").read_text())
    config["zero_optimization"].update(stage3_param_persistence_threshold=2000)
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    args = ["--deepspeed", str(tmp_path / "zero3.json"), *small_run(tiny_model, "--eval_size", EVAL_SIZE,
                                                                    "--dev_size", "9", "--epochs", "3", "--lr", "1e-3")]
    during, at_end = (run_ok(tmp_path, *args, "--held_out_at", when) for when in ("new_best", "end"))
    assert during["best_dev_epoch"] == at_end["best_dev_epoch"] < 3
    assert at_end["at_best_dev_epoch"] == during["at_best_dev_epoch"]
    assert at_end["at_best_dev_epoch"]["eval_loss"] != at_end["eval_loss"]  # not the last weights'
    assert (at_end["accuracy"], at_end["eval_loss"]) == (during["accuracy"], during["eval_loss"])


def test_zero3_bf16_reads_the_bidrop_section(tiny_model: Path, vader_cache: Path, tmp_path: Path) -> None:
    """Started as the installed recipe is: `torchrun -m bidrop_ds.recipes.finetune`."""
    config = json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text())
    config["bidrop"] = {"k": 3, "p": 0.5, "seed": 7}  # k is overridden by the --k flag of small_run
    path = tmp_path / "zero3_bf16_bidrop.json"
    path.write_text(json.dumps(config))
    summary = run_ok(tmp_path, "--deepspeed", str(path), *small_run(tiny_model, "--chunks", "2", "--eval_size",
                                                                    EVAL_SIZE, "--p", "0.5"), target=RECIPE)
    check_summary(summary, stage=3, dtype="bf16", p=0.5)
    assert (summary["bidrop"]["k"], summary["bidrop"]["seed"]) == (2, 7)


def test_zero2_offload_steps_deepspeed_cpu_adam(tiny_model: Path, vader_cache: Path, tmp_path: Path) -> None:
    """ZeRO-2 with offload_optimizer (ds_configs/zero2_offload.json, bf16): DeepSpeedCPUAdam steps the
    host partition (JIT-compiled on first use, cached in TORCH_EXTENSIONS_DIR: up to minutes), and
    the statistics live in host memory beside it, 4 bytes per eligible element owned."""
    summary = run_ok(tmp_path, "--deepspeed", str(ROOT / "ds_configs" / "zero2_offload.json"),
                     *small_run(tiny_model, "--chunks", "2", "--eval_size", EVAL_SIZE), timeout=900)
    check_summary(summary, stage=2, dtype="bf16", p=0.3)
    assert (summary["optimizer"], summary["statistics_device"]) == ("DeepSpeedCPUAdam", "cpu")


def test_uneven_batch_fails_fast_with_the_fix(tiny_model: Path, vader_cache: Path, tmp_path: Path) -> None:
    done = launch("--deepspeed", str(ROOT / "ds_configs" / "zero2_fp32.json"),
                  *small_run(tiny_model, "--batch_size", "18", "--chunks", "2"), timeout=120)
    assert done.returncode != 0
    assert "finetune.py: error: --batch_size 18 is the global batch" in done.stderr
    assert "Use --batch_size 16 or --batch_size 20" in done.stderr


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_two_ranks_ends_where_the_whole_run_does(tiny_model: Path, vader_cache: Path, tmp_path: Path,
                                                           stage: int) -> None:
    """8 steps on 2 ranks, saved after steps 3, 6 and 8; the step-8 save is cut (marker gone), so --resume
    restarts from step 6 (mid-way through epoch 2): fresh engine, ZeRO partitions loaded, the
    DistributedSampler's epoch and the data position restored. Metrics and fp32 weights are bit-equal."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    args = ["--deepspeed", str(ROOT / "ds_configs" / f"zero{stage}_fp32.json"),
            *small_run(tiny_model, "--seed", "3", "--epochs", "2", "--save_every", "3")]
    whole = run_ok(tmp_path, *args, "--save_dir", str(tmp_path / "whole"))
    assert sorted(path.name for path in (tmp_path / "whole").iterdir() if path.is_dir()) == ["step3", "step6", "step8"]
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    (tmp_path / "cut" / "step8" / "bidrop_complete.json").unlink()
    resumed = run_ok(tmp_path, *args, "--save_dir", str(tmp_path / "cut"), "--resume")
    assert (whole["resumed_from"], resumed["resumed_from"]) == (None, "step6")
    keys = ("eval_loss", "accuracy", "train_loss_last_epoch", "mean_kept_fraction", "lr_scheduler_steps", "final_lr")
    assert {key: resumed[key] for key in keys} == {key: whole[key] for key in keys}
    final = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "whole"), tag="step8")
    again = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "cut"), tag="step8")
    assert final.keys() == again.keys() and all(torch.equal(final[name], again[name]) for name in final)
