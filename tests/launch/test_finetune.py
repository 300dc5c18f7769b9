"""launch/finetune.py end to end on a tiny config-built BERT and small data files (no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest

from tests.data.test_glue import write_task
from tests.launch.conftest import small_run


def test_vader_demo_runs_bidrop_and_writes_json(finetune: ModuleType, tiny_model: Path, vader_cache: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    summary = finetune.main(small_run(tiny_model, "--chunks", "2", "--output_json", str(out)))
    assert json.loads(out.read_text()) == summary
    assert (summary["task"], summary["train_size"], summary["eval_size"]) == ("vader-movie", 64, 32)
    assert summary["bidrop"]["k"] == 2 and summary["bidrop"]["p"] == 0.3
    assert summary["mean_kept_fraction"] == pytest.approx(0.3, abs=0.01)
    assert summary["skipped_steps"] == 0
    assert math.isfinite(summary["train_loss_last_epoch"]) and math.isfinite(summary["eval_loss"])
    assert summary["accuracy"] in {i / 32 for i in range(33)}
    assert (summary["ranks"], summary["eval_examples"], summary["steps"]) == (1, 32, 4)
    assert summary["lr_scheduler_steps"] == 4 and summary["final_lr"] == 0.0  # the loop steps the schedule
    assert summary["plugin_bytes_per_rank"] == [8 * n for n in summary["owned_elements_per_rank"]]


def test_same_seeds_give_the_same_run(finetune: ModuleType, tiny_model: Path, vader_cache: Path) -> None:
    first = finetune.main(small_run(tiny_model, "--seed", "5", "--train_seed", "1"))
    second = finetune.main(small_run(tiny_model, "--seed", "5", "--train_seed", "1"))
    other = finetune.main(small_run(tiny_model, "--seed", "5", "--train_seed", "2"))
    assert first["eval_loss"] == second["eval_loss"]
    assert first["train_loss_last_epoch"] == second["train_loss_last_epoch"]
    assert other["eval_loss"] != first["eval_loss"]


def test_vanilla_setting_keeps_everything(finetune: ModuleType, tiny_model: Path, vader_cache: Path) -> None:
    summary = finetune.main(small_run(tiny_model, "--k", "1"))
    assert summary["mean_kept_fraction"] == 1.0


@pytest.mark.parametrize("task, metrics", [("rte", {"accuracy"}), ("stsb", {"pearson", "spearman"})])
def test_glue_pair_tasks_from_tsv(finetune: ModuleType, tiny_model: Path, tmp_path: Path, task: str,
                                  metrics: set[str]) -> None:
    write_task(tmp_path / "glue", task)
    summary = finetune.main(["--model", str(tiny_model), "--task", f"glue-{task}", "--glue_dir", str(tmp_path / "glue"),
                             "--batch_size", "2", "--max_length", "32"])
    assert (summary["train_size"], summary["eval_size"]) == (2, 2)
    assert metrics <= set(summary) and all(math.isfinite(summary[m]) for m in metrics)


def test_bad_arguments_are_reported(finetune: ModuleType, tiny_model: Path, vader_cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown --task 'vader-imdb'"):
        finetune.main(small_run(tiny_model, "--task", "vader-imdb"))
    with pytest.raises(SystemExit):
        finetune.main(small_run(tiny_model, "--chunks", "17"))
    with pytest.raises(ValueError, match=r"BiDropConfig\.p = 1\.5"):
        finetune.main(small_run(tiny_model, "--p", "1.5"))
