"""bidrop_ds.training.suite: the command line of a run (one process, or torchrun ranks with a DeepSpeed
config; on/off switches; the user's data instead of a task), and runs going side by side with a
failure named and the finished summaries kept (the recipe stood in for by a tiny script)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bidrop_ds.data.custom import DataSource
from bidrop_ds.training import suite
from bidrop_ds.training.suite import Launch, Run


def test_the_command_line_of_a_run(tmp_path: Path) -> None:
    run = Run("vader-movie", "bidrop", (("k", "4"), ("rescale", "off")), 3)
    assert run.label == "bidrop k=4 rescale=off" and run.run_id == "vader-movie/bidrop-k4-rescaleoff/seed3"
    one = suite.command(run, Launch(log_every=5), ["--epochs", "2"], tmp_path / "r.json")
    assert one == [sys.executable, "-m", "bidrop_ds.recipes.finetune", "--task", "vader-movie", "--strategy", "bidrop",
                   "--train_seed", "3", "--seed", "3", "--log_every", "5", "--output_json", str(tmp_path / "r.json"),
                   "--k", "4", "--no-rescale", "--epochs", "2"]
    (tmp_path / "reviews.csv").write_text("review,stars\nfine,good\n", encoding="utf-8")
    data = DataSource(train_file=str(tmp_path / "reviews.csv"), text_column=("review",), label_column="stars")
    ranks = suite.command(run, Launch(ranks=2, deepspeed="zero2.json", data=data), [], tmp_path / "r.json")
    assert ranks[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    assert "--task" not in ranks and ranks[ranks.index("--train_file") + 1] == data.train_file
    assert ranks[ranks.index("--deepspeed") + 1] == "zero2.json"


def test_runs_go_side_by_side_and_a_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Two at a time: three runs (each writes its summary as the recipe would), the failing one named, the
    others kept; a second call runs only what is not finished."""
    script = ("import json, os, sys, time; out = sys.argv[1]; time.sleep(0.5)\n"
              "if 'seed1' in out: sys.exit(3)\n"
              "json.dump({'headline_metric': 'accuracy', 'accuracy': 0.5, 'threads': os.environ['OMP_NUM_THREADS']},"
              " open(out, 'w'))")
    monkeypatch.setattr(suite, "command", lambda run, launch, extra, partial: [sys.executable, "-c", script,
                                                                               str(partial)])
    runs = [Run("t", "vanilla", (), seed) for seed in range(3)]
    assert suite.execute(runs, Launch(jobs=2, threads=1), [], tmp_path) == ["t/vanilla/seed1"]
    printed = capsys.readouterr()
    assert "3 to go" in printed.out and "FAILED t/vanilla/seed1 (exit 3)" in printed.err + printed.out
    done = {run.seed: json.loads(suite.result_path(tmp_path, run).read_text())["threads"]
            for run in runs if suite.result_path(tmp_path, run).exists()}
    assert done == {0: "1", 2: "1"}
    assert suite.execute(runs, Launch(jobs=2, threads=1), [], tmp_path) == ["t/vanilla/seed1"]
    assert "2 already finished, 1 to go" in capsys.readouterr().out
    assert suite.finish("study", "the table", ["t/vanilla/seed1"]) == 1 and suite.finish("study", "", []) == 0
