"""launch/regime_study.py without training: the plan (arms, paired seeds, equal-compute epochs), the
learning rate chosen on dev, and the paired t-intervals, on summaries written as finetune.py does."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.launch.conftest import load_script


@pytest.fixture(scope="module")
def study() -> ModuleType:
    return load_script("regime_study")


def summary(dev: list[float], held_out: float, last: float | None = None) -> dict:
    """A finetune.py --dev_size summary whose best-dev epoch is the argmax of `dev`; `last`: the
    held-out metric at the last epoch (default: the best-dev epoch's)."""
    best = dev.index(max(dev)) + 1
    history = [{"epoch": e + 1, "train_loss": 0.5 / (e + 1), "dev_accuracy": d, "accuracy": 0.0} for e, d in enumerate(dev)]
    return {"headline_metric": "accuracy", "epoch_history": history, "best_dev_epoch": best,
            "at_best_dev_epoch": {"accuracy": held_out}, "accuracy": held_out if last is None else last}


def test_plan_pairs_seeds_and_gives_vanilla_k_times_the_epochs(study: ModuleType) -> None:
    arms = study.arms("strategies", 3)
    assert [arm.label for arm in arms] == ["vanilla", "vanilla epochs=6", "vanilla epochs=12", "bidrop k=2",
                                           "bidrop k=4", "childtuning-d", "dps"]
    runs = study.plan(["vader-transfer"], arms, ["2e-5", "1e-4"], [0, 1], 3)
    assert len(runs) == 7 * 2 * 2
    epochs = {arm.label: {dict(run.variant)["epochs"] for run, (_, a, _) in runs.items() if a == arm} for arm in arms}
    assert epochs["vanilla epochs=12"] == {"12"} and epochs["bidrop k=4"] == {"3"}
    bidrop = next(run for run, (_, arm, lr) in runs.items() if arm.label == "bidrop k=2" and lr == "1e-4")
    assert dict(bidrop.variant) == {"epochs": "3", "k": "2", "lr": "1e-4", "train_size": "500", "dev_size": "100",
                                   "batch_size": "16"}
    assert [run.seed for run in runs][:14] == [0] * 14  # seed by seed: an interrupted study pairs whole seeds
    assert [a.label for a in study.arms("strategies", 3, ks=[2], strategies=["vanilla", "bidrop"])] == [
        "vanilla", "vanilla epochs=6", "bidrop k=2"]
    sweep = study.arms("sensitivity", 3)
    assert len(sweep) == 1 + 4 * 2 and len(set(sweep)) == len(sweep)
    assert study.Arm("bidrop", (("k", "2"),)) in sweep  # p=0.3 without rescale: the strategies table's runs
    assert [a.label for a in sweep[1:3]] == ["bidrop k=2 p=0.1", "bidrop k=2 p=0.1 rescale=on"]
    assert [a.label for a in study.arms("sensitivity", 3, rescales=["off"])] == [
        "vanilla", "bidrop k=2 p=0.1", "bidrop k=2", "bidrop k=2 p=0.5", "bidrop k=2 p=0.7"]


def test_lr_is_chosen_on_dev_and_paired_differences_get_t_intervals(study: ModuleType, tmp_path: Path) -> None:
    arms = [study.Arm("vanilla"), study.Arm("vanilla", (("epochs", "4"),)), study.Arm("bidrop", (("k", "2"),))]
    runs = study.plan(["vader-movie-lowres-250"], arms, ["2e-5", "1e-4"], [0, 1], 2)
    results = {  # (arm, lr) -> per seed (dev curve, held-out at the best-dev epoch)
        ("vanilla", "2e-5"): [([0.60, 0.65], 0.70), ([0.62, 0.61], 0.72)],
        ("vanilla", "1e-4"): [([0.50, 0.55], 0.90), ([0.52, 0.51], 0.90)],  # better held out, worse dev: not chosen
        ("vanilla epochs=4", "2e-5"): [([0.6, 0.7, 0.6, 0.5], 0.75), ([0.6, 0.6, 0.6, 0.6], 0.70)],
        ("vanilla epochs=4", "1e-4"): [([0.5, 0.5, 0.5, 0.5], 0.99), ([0.5, 0.5, 0.5, 0.5], 0.99)],
        ("bidrop k=2", "2e-5"): [([0.40, 0.45], 0.50), ([0.40, 0.41], 0.50)],
        ("bidrop k=2", "1e-4"): [([0.70, 0.72], 0.73), ([0.71, 0.70], 0.76)],
    }
    for run, (_, arm, lr) in runs.items():
        if (arm.label, lr) in results and (arm.label, lr, run.seed) != ("bidrop k=2", "2e-5", 1):
            path = study.suite.result_path(tmp_path, run)
            path.parent.mkdir(parents=True, exist_ok=True)
            dev, held_out = results[arm.label, lr][run.seed]
            path.write_text(json.dumps(summary(dev, held_out, last=held_out - 0.01 * (arm.strategy == "bidrop"))),
                            encoding="utf-8")
    text = study.report(runs, tmp_path, "strategies", 2, "python launch/regime_study.py ...")
    assert "bidrop k=2 | 1e-4 | 73.00 ± 0.00 (n=1)" in text  # seed 1 is chosen on once every lr has it
    path = study.suite.result_path(tmp_path, next(run for run, (_, arm, lr) in runs.items()
                                                      if (arm.label, lr, run.seed) == ("bidrop k=2", "2e-5", 1)))
    path.write_text(json.dumps(summary(*results["bidrop k=2", "2e-5"][1])), encoding="utf-8")
    text = study.report(runs, tmp_path, "strategies", 2, "python launch/regime_study.py ...")
    assert "| vader-movie-lowres-250 | vanilla | 2e-5 | 71.00 ± 1.00 (n=2) |" in text
    assert "| vader-movie-lowres-250 | bidrop k=2 | 1e-4 | 74.50 ± 1.50 (n=2) |" in text
    with open(tmp_path / "paired.csv", encoding="utf-8") as handle:
        rows = {row["setting"]: row for row in csv.DictReader(handle)}
    # bidrop - vanilla per seed: 3 and 4 points; mean 3.5, std 0.7071, half width 12.706 x 0.7071 / sqrt(2)
    versus_vanilla = rows["k=2"]
    assert (versus_vanilla["strategy"], versus_vanilla["n"], versus_vanilla["wins"]) == ("bidrop", "2", "2")
    assert float(versus_vanilla["mean_diff"]) == pytest.approx(3.5)
    assert float(versus_vanilla["ci_low"]) == pytest.approx(3.5 - 6.353, abs=1e-3)
    assert float(versus_vanilla["ci_high"]) == pytest.approx(3.5 + 6.353, abs=1e-3)
    equal = rows["k=2 (equal compute: vs vanilla epochs=4)"]  # vanilla at 2x the epochs: 75, 70
    assert (float(equal["mean_diff"]), equal["wins"]) == (pytest.approx(2.0), "1")
    # at the last epoch Bi-Drop's held-out is 1 point lower than at its best-dev one, vanilla's the same
    last = rows["k=2, last epoch"]
    assert (float(last["mean_diff"]), last["n"], last["wins"]) == (pytest.approx(2.5), "2", "2")
    assert "| bidrop k=2 | 1e-4 | 74.50 ± 1.50 (n=2) | 71.50 ± 0.50 | 0.2500, 71.00 | 73.50 ± 1.50 |" in text
    assert (tmp_path / "paired.csv").read_text() == (tmp_path / "strategies_paired.csv").read_text()
    assert (tmp_path / "strategies_curves.png").stat().st_size > 0


def test_t_interval_by_hand(study: ModuleType) -> None:
    mean, low, high = study.t_interval([1.0, 2.0, 3.0])  # std 1, t(0.975, 2) = 4.303
    assert (mean, low, high) == (2.0, pytest.approx(2 - 4.303 / math.sqrt(3)), pytest.approx(2 + 4.303 / math.sqrt(3)))
    assert math.isnan(study.t_interval([1.0])[1])


def test_t_test_p_against_closed_forms(study: ModuleType) -> None:
    """The two-sided p against the t distribution's closed-form CDFs (df 1: Cauchy, 2, 4) and the
    t-interval: p < 0.05 exactly when the 95% interval leaves out 0."""
    assert study.t_test_p([1.0, 3.0]) == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-10)  # t = 2, df 1
    t = 2 / (1 / math.sqrt(3))  # [1, 2, 3]: mean 2, std 1, df 2
    assert study.t_test_p([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    t = 3 / (math.sqrt(2.5) / math.sqrt(5))  # [1..5]: mean 3, std sqrt(2.5), df 4
    a = 1 + t * t / 4
    cdf = 0.5 + 3 / 8 * t / math.sqrt(a) * (1 - t * t / (12 * a))
    assert study.t_test_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 * (1 - cdf), rel=1e-8)
    assert (study.t_test_p([0.5, 0.5]), study.t_test_p([0.0, 0.0]), math.isnan(study.t_test_p([1.0]))) == (0.0, 1.0, True)
    for shift in (0.1, 0.6, 1.0, 1.3, 2.5):
        values = [shift - 1.2, shift + 0.4, shift + 0.9, shift - 0.3, shift + 1.1]
        assert (study.t_test_p(values) < 0.05) == (study.t_interval(values)[1] > 0)


def test_holm_adjusts_within_each_task(study: ModuleType) -> None:
    adjusted = study.holm([0.01, 0.04, 0.03, math.nan])  # sorted 0.01 x 3, 0.03 x 2, then 0.04 x 1 (kept monotone)
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    rows = [{"task": "a", "p": 0.01}, {"task": "a / tweets", "p": 0.02}, {"task": "b", "p": 0.02}]
    assert [row["p_holm"] for row in study.with_holm(rows)] == [0.02, 0.02, 0.02]  # a's family: 2 rows; b: 1


def test_lr_seeds_choose_on_the_first_seeds_and_run_the_rest_at_that_lr(study: ModuleType, tmp_path: Path) -> None:
    arms = [study.Arm("vanilla"), study.Arm("bidrop", (("k", "2"),))]
    runs = study.plan(["vader-movie-lowres-250"], arms, ["2e-5", "1e-4"], [0, 1, 2], 2)
    assert study.remaining_runs(runs, tmp_path, [0]) == []  # nothing tuned yet: no later run is planned
    dev = {("vanilla", "2e-5"): [0.6, 0.7], ("vanilla", "1e-4"): [0.5, 0.5],
           ("bidrop k=2", "2e-5"): [0.5, 0.5], ("bidrop k=2", "1e-4"): [0.6, 0.8]}
    for run, (_, arm, lr) in runs.items():
        if run.seed == 0:
            path = study.suite.result_path(tmp_path, run)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary(dev[arm.label, lr], 0.7)), encoding="utf-8")
    assert study.remaining_runs(runs, tmp_path, [0, 1]) == []  # seed 1 may still change the choice
    text = study.report(runs, tmp_path, "strategies", 2, "python launch/regime_study.py ...", tuning=[0, 1])
    assert "| vader-movie-lowres-250 | bidrop k=2 | 1e-4 (provisional) | 70.00 ± 0.00 (n=1) |" in text
    later = study.remaining_runs(runs, tmp_path, [0])
    assert sorted((run.seed, run.strategy, dict(run.variant)["lr"]) for run in later) == [
        (1, "bidrop", "1e-4"), (1, "vanilla", "2e-5"), (2, "bidrop", "1e-4"), (2, "vanilla", "2e-5")]
    for run in later[:2]:  # seed 1 of both arms, at the chosen lr
        path = study.suite.result_path(tmp_path, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary([0.1, 0.2], 0.75 if run.strategy == "bidrop" else 0.7)), encoding="utf-8")
    text = study.report(runs, tmp_path, "strategies", 2, "python launch/regime_study.py ...", tuning=[0])
    assert "(of seeds 0;" in text and "| vader-movie-lowres-250 | bidrop k=2 | 1e-4 | 72.50 ± 2.50 (n=2) |" in text


def test_a_tie_on_dev_goes_to_the_first_lr_whatever_the_float_rounding(study: ModuleType, tmp_path: Path) -> None:
    """Mean dev 0.4 at both rates (as floats, 0.1 + 0.7 sums below 0.3 + 0.5): the first of --lrs wins."""
    runs = study.plan(["vader-movie-lowres-250"], [study.Arm("vanilla")], ["2e-5", "1e-4"], [0, 1], 2)
    dev = {"2e-5": (0.1, 0.7), "1e-4": (0.3, 0.5)}
    for run, (_, _, lr) in runs.items():
        path = study.suite.result_path(tmp_path, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary([dev[lr][run.seed]], 0.7)), encoding="utf-8")
    picked = study.chosen(study.collect(runs, tmp_path), runs)
    assert picked["vader-movie-lowres-250", study.Arm("vanilla")][0] == "2e-5"


def test_an_arms_later_seeds_start_once_its_own_lr_is_chosen(study: ModuleType, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--lr_seeds: one queue. Vanilla's tuning is over, so its later seed runs beside Bi-Drop's last
    (slow) tuning run instead of after it; Bi-Drop's later seed follows, at its chosen lr."""
    events = tmp_path / "events.txt"
    script = ("import json, sys, time; out, run_id, events = sys.argv[1:]\n"
              "open(events, 'a').write(f'start {run_id}\\n')\n"
              "time.sleep(3 if 'bidrop' in run_id and run_id.endswith('seed0') else 0)\n"
              "dev = 0.9 if '1e-4' in run_id else 0.6\n"
              "json.dump({'headline_metric': 'accuracy', 'epoch_history': [{'dev_accuracy': dev, 'train_loss': 0.1}],"
              " 'best_dev_epoch': 1,"
              " 'at_best_dev_epoch': {'accuracy': 0.7}, 'accuracy': 0.7}, open(out, 'w'))\n"
              "open(events, 'a').write(f'end {run_id}\\n')")
    monkeypatch.setattr(study.suite, "command", lambda run, args, extra, partial: [
        sys.executable, "-c", script, str(partial), run.run_id, str(events)])
    arms = [study.Arm("vanilla"), study.Arm("bidrop", (("k", "2"),))]
    runs = study.plan(["vader-movie-lowres-250"], arms, ["2e-5", "1e-4"], [0, 1], 2)
    last_tuning = [run for run in runs if run.seed == 0][-1]  # Bi-Drop's at 1e-4
    for run in runs:  # seed 0 finished but for that one
        if run.seed == 0 and run != last_tuning:
            path = study.suite.result_path(tmp_path, run)
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(study.suite.command(run, None, [], path), check=True)
    events.unlink()
    assert study.main(["--table", "strategies", "--out", str(tmp_path), "--strategies", "bidrop", "--ks", "2",
                       "--tasks", "vader-movie-lowres-250", "--lrs", "2e-5", "1e-4", "--seeds", "0", "1",
                       "--epochs", "2", "--lr_seeds", "1", "--jobs", "2"]) == 0
    lines = events.read_text(encoding="utf-8").splitlines()
    vanilla_later, bidrop_later = (f"vader-movie-lowres-250/{name}-batch_size16-dev_size50-epochs2{k}-lr1e-4-"
                                   "train_size0/seed1" for name, k in (("vanilla", ""), ("bidrop", "-k2")))
    assert lines.index(f"start {vanilla_later}") < lines.index(f"end {last_tuning.run_id}")
    assert lines.index(f"end {last_tuning.run_id}") < lines.index(f"start {bidrop_later}")
    assert len(lines) == 6  # three runs, none twice


def test_every_run_evaluates_held_out_at_the_end(study: ModuleType, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The study's runs get --held_out_at end; flags after `--` follow it (so the caller's win)."""
    given = []
    monkeypatch.setattr(study.suite, "execute", lambda runs, args, extra, out, more=None: given.append(extra) or [])
    study.main(["--table", "sensitivity", "--out", str(tmp_path), "--lrs", "2e-5", "--seeds", "0",
                "--", "--eval_size", "8"])
    assert given == [["--held_out_at", "end", "--eval_size", "8"]]


def test_a_swept_p_is_also_paired_with_bidrop_at_its_defaults(study: ModuleType, tmp_path: Path) -> None:
    arms = study.arms("sensitivity", 2)
    runs = study.plan(["vader-movie-lowres-250"], arms, ["2e-5"], [0, 1], 2)
    held = {"vanilla": (0.70, 0.72), "bidrop k=2": (0.71, 0.70), "bidrop k=2 p=0.5": (0.74, 0.71),
            "bidrop k=2 p=0.5 rescale=on": (0.75, 0.71), "bidrop k=2 rescale=on": (0.71, 0.71)}
    for run, (_, arm, _) in runs.items():
        if arm.label in held:
            path = study.suite.result_path(tmp_path, run)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary([0.6, 0.7], held[arm.label][run.seed])), encoding="utf-8")
    study.report(runs, tmp_path, "sensitivity", 2, "python launch/regime_study.py ...")
    with open(tmp_path / "sensitivity_paired.csv", encoding="utf-8") as handle:
        rows = {row["setting"]: row for row in csv.DictReader(handle)}
    assert not (tmp_path / "paired.csv").exists()  # the strategies table's name
    assert float(rows["k=2 p=0.5"]["mean_diff"]) == pytest.approx(1.5)  # vs vanilla: +4, -1
    defaults = rows["k=2 p=0.5 (defaults: vs bidrop k=2)"]  # +3, +1
    assert (float(defaults["mean_diff"]), defaults["wins"]) == (pytest.approx(2.0), "2")
    assert "k=2 (defaults: vs bidrop k=2)" not in rows and "k=2" in rows  # the default arm: vs vanilla only
    assert float(rows["k=2 p=0.5 rescale=on (rescale off: vs bidrop k=2 p=0.5)"]["mean_diff"]) == pytest.approx(0.5)
    assert float(rows["k=2 rescale=on (defaults: vs bidrop k=2)"]["mean_diff"]) == pytest.approx(0.5)
    assert not any(setting.startswith("k=2 rescale=on (rescale off") for setting in rows)  # the same baseline


def test_each_further_held_out_set_gets_its_own_paired_rows(study: ModuleType) -> None:
    """vader-transfer's out-of-domain sets: rows `TASK / SET`, from the prefixed keys of each summary."""
    def run(movie: float, tweets: float) -> dict:
        scores = {"accuracy": movie, "tweets_accuracy": tweets}
        return {"headline_metric": "accuracy", "eval_sets": {"movie": 9, "tweets": 9},
                "at_best_dev_epoch": scores, **{key: value - 0.01 for key, value in scores.items()}}
    picked = {("vader-transfer", study.Arm("vanilla")): ("2e-5", {0: run(0.80, 0.60), 1: run(0.82, 0.62)}),
              ("vader-transfer", study.Arm("dps")): ("2e-5", {0: run(0.81, 0.65), 1: run(0.80, 0.66)})}
    rows = {(row["task"], row["setting"]): row for row in study.paired_rows(picked, 2)}
    assert set(rows) == {("vader-transfer", "-"), ("vader-transfer / tweets", "-")}
    assert rows["vader-transfer", "-"]["mean_diff"] == pytest.approx(-0.5)  # +1, -2
    assert (rows["vader-transfer / tweets", "-"]["mean_diff"], rows["vader-transfer / tweets", "-"]["wins"]) == (
        pytest.approx(4.5), 2)


def test_a_command_for_part_of_a_table_keeps_the_rest_of_it(study: ModuleType, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--tasks / --strategies narrow what runs, not the tables: runs of other tasks and arms stay in them."""
    monkeypatch.setattr(study.suite, "execute", lambda runs, args, extra, out, more=None: [])
    arms = [study.Arm("vanilla"), study.Arm("dps"), study.Arm("bidrop", (("k", "2"),))]
    for run, (task, arm, _) in study.plan(["vader-movie-lowres-250", "vader-transfer"], arms, ["2e-5"], [0, 1],
                                          3).items():
        if (task, arm.strategy) != ("vader-transfer", "dps"):
            path = study.suite.result_path(tmp_path, run)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary([0.6, 0.7, 0.65], 0.7 + 0.01 * (arm.strategy != "vanilla"))),
                            encoding="utf-8")
    study.main(["--table", "strategies", "--out", str(tmp_path), "--tasks", "vader-transfer", "--strategies",
                "bidrop", "--ks", "2", "--lrs", "2e-5", "--seeds", "0", "1", "--epochs", "3", "--report_only",
                "--", "--max_length", "32"])
    with open(tmp_path / "paired.csv", encoding="utf-8") as handle:
        rows = {(row["task"], row["strategy"], row["setting"]) for row in csv.DictReader(handle)}
    assert {("vader-movie-lowres-250", "dps", "-"), ("vader-movie-lowres-250", "bidrop", "k=2"),
            ("vader-transfer", "bidrop", "k=2")} <= rows
    text = (tmp_path / "strategies.md").read_text(encoding="utf-8")
    assert (f"`python launch/regime_study.py --table strategies --out {tmp_path} --epochs 3 --lrs 2e-5 --seeds 0 1 "
            "-- --max_length 32`") in text
