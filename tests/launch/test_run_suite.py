"""launch/run_suite.py: the plan of runs and sweeps, a real (tiny) suite end to end with its
table, CSV and plots, and resuming a suite that already has finished runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.launch.conftest import ROOT


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_suite", ROOT / "launch" / "run_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_suite"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_plan_sweeps_k_only_for_bidrop_strategies(suite: ModuleType) -> None:
    runs = suite.plan(["t"], ["vanilla", "bidrop", "bidrop-random"], suite.parse_sweeps(["k=2,4", "p=0.1,0.3"]), [0, 1])
    labels = list(dict.fromkeys(run.label for run in runs))
    assert labels == ["vanilla p=0.1", "vanilla p=0.3", "bidrop k=2 p=0.1", "bidrop k=2 p=0.3", "bidrop k=4 p=0.1",
                      "bidrop k=4 p=0.3", "bidrop-random k=2 p=0.1", "bidrop-random k=2 p=0.3",
                      "bidrop-random k=4 p=0.1", "bidrop-random k=4 p=0.3"]
    assert len(runs) == 2 * len(labels) and len({run.run_id for run in runs}) == len(runs)
    assert runs[4].run_id == "t/bidrop-k2-p0.1/seed0"


@pytest.mark.parametrize("sweeps,message", [(["q=1,2"], "NAME one of"), (["k="], "NAME one of"),
                                            (["k=2", "k=4"], "given twice")])
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
            "--log_every", "1", "--", "--model", str(tiny_model), "--train_size", "32", "--eval_size", "16",
            "--max_length", "16", "--batch_size", "16"]
    assert suite.main(argv) == 0
    first = capsys.readouterr().out
    assert "4 to go" in first
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
