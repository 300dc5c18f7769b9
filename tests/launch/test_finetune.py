"""launch/finetune.py end to end on a tiny config-built BERT and small data files (no network)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

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
    # k = 2, fp32: the first pass of the eligible elements only (the flat .grad buffer is the gradient)
    assert summary["plugin_bytes_per_rank"] == [4 * n for n in summary["eligible_owned_elements_per_rank"]]


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


def test_bad_arguments_are_reported(finetune: ModuleType, tiny_model: Path, vader_cache: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        finetune.main(small_run(tiny_model, "--task", "vader-imdb"))
    assert "finetune.py: error: unknown --task 'vader-imdb'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(small_run(tiny_model, "--chunks", "17"))
    with pytest.raises(SystemExit, match=r"^finetune.py: error: BiDropConfig\.p = 1\.5"):
        finetune.main(small_run(tiny_model, "--p", "1.5"))


RESUME_KEYS = ("eval_loss", "accuracy", "train_loss_last_epoch", "mean_kept_fraction", "skipped_steps",
               "lr_scheduler_steps", "final_lr", "fisher_batches", "epoch_history", "best_dev_epoch", "at_best_dev_epoch")


def saved_model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "bidrop_checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("strategy, k", [("bidrop", "2"), ("childtuning-d", "1")])
def test_resume_ends_bit_for_bit_where_the_whole_run_does(finetune: ModuleType, tiny_model: Path, vader_cache: Path,
                                                          tmp_path: Path, strategy: str, k: str) -> None:
    """2 epochs of 4 steps, saved after steps 3, 6 and 8; the run is cut during its last save (the
    marker of step 8 is gone), so --resume goes on from step 6: mid-way through the second epoch, whose
    order it must replay (the shuffle generator has moved on since the start). The first epoch's dev
    and held-out metrics (--dev_size) come back from the checkpoint."""
    args = small_run(tiny_model, "--strategy", strategy, "--k", k, "--seed", "3", "--epochs", "2", "--save_every", "3",
                     "--dev_size", "8")
    whole = finetune.main([*args, "--save_dir", str(tmp_path / "whole")])
    assert sorted(path.name for path in (tmp_path / "whole").iterdir()) == ["step3", "step6", "step8"]
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    (tmp_path / "cut" / "step8" / "bidrop_complete.json").unlink()
    resumed = finetune.main([*args, "--save_dir", str(tmp_path / "cut"), "--resume"])
    assert (whole["resumed_from"], resumed["resumed_from"]) == (None, "step6")
    assert {key: resumed[key] for key in RESUME_KEYS} == {key: whole[key] for key in RESUME_KEYS}
    final, again = saved_model(tmp_path / "whole" / "step8"), saved_model(tmp_path / "cut" / "step8")
    assert final.keys() == again.keys() and all(torch.equal(final[name], again[name]) for name in final)
    assert any(not torch.equal(final[name], saved_model(tmp_path / "whole" / "step6")[name]) for name in final)


def test_resume_after_the_last_step_only_evaluates(finetune: ModuleType, tiny_model: Path, vader_cache: Path,
                                                  tmp_path: Path) -> None:
    args = small_run(tiny_model, "--seed", "3", "--save_dir", str(tmp_path / "run"))
    whole = finetune.main(args)
    written = (tmp_path / "run" / "step4" / "bidrop_complete.json").read_text()
    again = finetune.main([*args, "--resume"])
    assert again["resumed_from"] == "step4" and again["eval_loss"] == whole["eval_loss"]
    assert (tmp_path / "run" / "step4" / "bidrop_complete.json").read_text() == written  # not saved again


def test_resume_refuses_other_settings_and_missing_checkpoints(finetune: ModuleType, tiny_model: Path,
                                                               vader_cache: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        finetune.main(small_run(tiny_model, "--resume"))
    assert "--save_every and --resume need --save_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(small_run(tiny_model, "--resume", "--save_dir", str(tmp_path / "empty")))
    assert "--resume: no complete checkpoint in --save_dir" in capsys.readouterr().err
    finetune.main(small_run(tiny_model, "--save_dir", str(tmp_path / "run")))
    with pytest.raises(SystemExit, match=r"step4 was saved with other settings: lr 0\.0001, now 0\.0002"):
        finetune.main(small_run(tiny_model, "--save_dir", str(tmp_path / "run"), "--resume", "--lr", "2e-4"))
    args = finetune.parse_args(small_run(tiny_model, "--save_dir", str(tmp_path / "run"), "--resume"))
    config = finetune.BiDropConfig.from_args(args)
    finetune.check_resume(args, config, 1)
    with pytest.raises(SystemExit, match=r"ranks 1, now 2\. Resume with the saved settings"):  # before any process group
        finetune.check_resume(args, config, 2)
    marker = tmp_path / "run" / "step4" / "bidrop_complete.json"  # as save_checkpoint leaves it without description=
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "description": None}))
    with pytest.raises(SystemExit, match=r"step4 was not saved by finetune.py --save_dir"):
        finetune.check_resume(args, config, 1)
