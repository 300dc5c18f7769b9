"""launch/run_suite.py: the plan of runs and sweeps, a real (tiny) suite end to end with its
table, CSV and plots, and resuming a suite that already has finished runs."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from types import ModuleType

import pytest

from bidrop_ds.training import suite as suite_runs
from tests.launch.conftest import load_script


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    return load_script("run_suite")


def test_plan_sweeps_k_only_for_bidrop_strategies(suite: ModuleType) -> None:
    runs = suite.plan(["t"], ["vanilla", "bidrop", "bidrop-random"], suite.parse_sweeps(["k=2,4", "p=0.1,0.3"]), [0, 1])
    labels = list(dict.fromkeys(run.label for run in runs))
    assert labels == ["vanilla p=0.1", "vanilla p=0.3", "bidrop k=2 p=0.1", "bidrop k=2 p=0.3", "bidrop k=4 p=0.1",
                      "bidrop k=4 p=0.3", "bidrop-random k=2 p=0.1", "bidrop-random k=2 p=0.3",
                      "bidrop-random k=4 p=0.1", "bidrop-random k=4 p=0.3"]
    assert len(runs) == 2 * len(labels) and len({run.run_id for run in runs}) == len(runs)
    assert runs[4].run_id == "t/bidrop-k2-p0.1/seed0"


@pytest.mark.parametrize("sweeps,message", [(["q=1,2"], "NAME one of"), (["k="], "NAME one of"),
                                            (["k=2", "k=4"], "given twice"), (["rescale=yes"], "on and off")])
def test_bad_sweeps_are_refused(suite: ModuleType, sweeps: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        suite.parse_sweeps(sweeps)


def test_ranks_need_deepspeed(suite: ModuleType, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x", "--ranks", "2"])
    assert "give --deepspeed" in capsys.readouterr().err


def test_tiny_suite_end_to_end_and_resume(suite: ModuleType, tiny_model: Path, vader_cache: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "suite"
    argv = ["--out", str(out), "--strategies", "vanilla", "bidrop", "--tasks", "vader-movie", "--seeds", "0", "1",
            "--log_every", "1", "--jobs", "2", "--", "--model", str(tiny_model), "--train_size", "32",
            "--eval_size", "16", "--max_length", "16", "--batch_size", "16"]
    assert suite.main(argv) == 0
    first = capsys.readouterr().out
    assert "4 to go (logs in" in first and "2 at a time" in first
    assert "train:" in (out / "logs" / "vader-movie" / "bidrop" / "seed1.log").read_text()  # progress in the log
    summaries = {path.relative_to(out / "runs").as_posix(): json.loads(path.read_text())
                 for path in (out / "runs").rglob("seed*.json")}
    assert sorted(summaries) == [f"vader-movie/{s}/seed{i}.json" for s in ("bidrop", "vanilla") for i in (0, 1)]
    assert summaries["vader-movie/vanilla/seed0.json"]["bidrop"]["strategy"] == "vanilla"
    assert summaries["vader-movie/bidrop/seed1.json"]["layer_kept"], "Bi-Drop runs log their kept fraction per layer"
    with open(out / "results.csv", encoding="utf-8") as handle:
        rows = {row["strategy"]: row for row in csv.DictReader(handle)}
    for strategy in ("vanilla", "bidrop"):
        scores = [summaries[f"vader-movie/{strategy}/seed{i}.json"]["accuracy"] for i in (0, 1)]
        assert float(rows[strategy]["mean"]) == pytest.approx(statistics.fmean(scores))
        assert float(rows[strategy]["std"]) == pytest.approx(statistics.stdev(scores))
        assert float(rows[strategy]["max"]) == pytest.approx(max(scores))
    table = (out / "results.md").read_text()
    assert "| vanilla |" in table and "| bidrop |" in table and "vader-movie (accuracy)" in table
    assert (out / "scores.png").stat().st_size > 0 and (out / "kept_by_layer.png").stat().st_size > 0
    assert suite.main(argv) == 0  # resumed: everything is finished, nothing runs again
    assert "4 already finished, 0 to go" in capsys.readouterr().out


def test_own_data_goes_to_every_run_and_best_dev_scores_get_their_own_table(suite: ModuleType, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    train = tmp_path / "reviews.csv"
    train.write_text("review,stars\nfine,good\nawful,bad\n", encoding="utf-8")
    out = tmp_path / "suite"
    argv = ["--out", str(out), "--train_file", str(train), "--text_column", "review", "--label_column", "stars",
            "--seeds", "0", "1", "--", "--dev_size", "4"]
    args, extra = suite.parse_args(argv)
    runs = suite.plan(args.tasks, args.strategies, args.grid, args.seeds)
    assert args.tasks == ["reviews"] and [run.run_id for run in runs][:2] == ["reviews/vanilla/seed0", "reviews/vanilla/seed1"]
    command = suite_runs.command(runs[0], args.launch, extra, tmp_path / "run.json")
    assert "--task" not in command and command[-2:] == ["--dev_size", "4"]
    switched = suite_runs.command(suite.Run("t", "bidrop", (("rescale", "on"), ("p", "0.5")), 0), args.launch, [],
                                  tmp_path / "r")
    assert switched[-3:] == ["--rescale", "--p", "0.5"]
    assert command[command.index("--train_file"):command.index("--train_file") + 6] == [
        "--train_file", str(train), "--text_column", "review", "--label_column", "stars"]
    scores = {"vanilla": [(0.50, 0.70), (0.60, 0.80)], "bidrop": [(0.40, 0.90), (0.30, 0.60)]}  # (last, best dev)
    for run in runs:  # finished runs, as finetune.py --dev_size writes their summaries
        last, best = scores[run.strategy][run.seed]
        path = suite.result_path(out, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"headline_metric": "accuracy", "accuracy": last, "eval_sets": {"validation": 10},
                                    "at_best_dev_epoch": {"accuracy": best}}), encoding="utf-8")
    assert suite.main([*argv[:-3], "--report_only"]) == 0
    with open(out / "results.csv", encoding="utf-8") as handle:
        means = {(row["at"], row["strategy"]): float(row["mean"]) for row in csv.DictReader(handle)}
    assert means == pytest.approx({("last", "vanilla"): 0.55, ("last", "bidrop"): 0.35,
                                   ("best_dev", "vanilla"): 0.75, ("best_dev", "bidrop"): 0.75})
    table = (out / "results.md").read_text()
    assert table.index("Held-out at the last epoch") < table.index("| vanilla | 55.00") < table.index(
        "Held-out at the best-dev epoch") < table.index("| vanilla | 75.00")
    assert (out / "scores_best_dev.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x", "--tasks", "vader-movie", "--train_file", str(train)])
    assert "give --tasks or your own data" in capsys.readouterr().err
