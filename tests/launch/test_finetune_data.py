"""launch/finetune.py on users' own files with a dev split (per-epoch evaluation, held-out metrics at
the best-dev and the last epoch), and its one-line errors for launcher mistakes (tiny BERT, no network)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import datasets
import pytest


CLASSES = {"good": "a warm funny moving film", "bad": "a dull clumsy tedious mess", "ok": "a film of some sort"}


def write_reviews(path: Path, count: int) -> Path:
    """`count` rows of a CSV with a `review` text column and a `stars` class-name column."""
    names = list(CLASSES)
    lines = ["review,stars"] + [f"{CLASSES[names[i % 3]]} number {i},{names[i % 3]}" for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_own_csv_with_a_dev_split_reports_the_best_dev_and_the_last_epoch(finetune: ModuleType, tiny_model: Path,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = write_reviews(tmp_path / "reviews.csv", 100), write_reviews(tmp_path / "more.csv", 12)
    out = tmp_path / "summary.json"
    built = []  # the model finetune.py trains, to read its config
    build_model = finetune.build_model
    monkeypatch.setattr(finetune, "build_model", lambda *args, **kwargs: built.append(build_model(*args, **kwargs))
                        or built[-1])
    summary = finetune.main(["--model", str(tiny_model), "--train_file", str(train), "--test_file", str(test),
                             "--text_column", "review", "--label_column", "stars", "--train_size", "0",
                             "--dev_size", "16", "--epochs", "3", "--batch_size", "16", "--max_length", "32",
                             "--lr", "1e-3", "--seed", "0", "--output_json", str(out)])
    written = json.loads(out.read_text())
    assert written["id2label"] == {"0": "bad", "1": "good", "2": "ok"} and written["label2id"]["ok"] == 2
    assert built[0].config.id2label == {0: "bad", 1: "good", 2: "ok"} and built[0].config.label2id["good"] == 1
    assert (summary["task"], summary["headline_metric"]) == ("reviews", "accuracy")
    # 100 rows: 10 validation (the seeded 10%), 16 dev, 74 trained on; the test file is the second held-out set
    assert (summary["train_size"], summary["dev_size"], summary["eval_sets"]) == (74, 16, {"validation": 10, "test": 12})
    assert summary["steps"] == 3 * 5 and summary["data"][:2] == ["--train_file", str(train)]
    history = summary["epoch_history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    dev_scores = [row["dev_accuracy"] for row in history]
    for epoch, row in enumerate(history):
        assert row["dev_eval_examples"] == 16 and {"dev_accuracy", "dev_macro_f1", "train_loss"} <= set(row)
        assert "dev_mcc" not in row  # three classes
        # the held-out sets run only where they can be reported: a new best dev score, or the last epoch
        reported = epoch == len(history) - 1 or dev_scores[epoch] > max(dev_scores[:epoch], default=-1.0)
        assert ("accuracy" in row) == reported
        if reported:
            assert row["eval_examples"] == 10 and row["test_eval_examples"] == 12
            assert {"accuracy", "macro_f1", "test_accuracy"} <= set(row)
    best = history[summary["best_dev_epoch"] - 1]
    assert best["dev_accuracy"] == max(dev_scores) and summary["best_dev_epoch"] == 1 + dev_scores.index(max(dev_scores))
    assert summary["at_best_dev_epoch"] == {key: value for key, value in best.items()
                                            if key not in ("epoch", "train_loss") and not key.startswith("dev_")}
    last = history[-1]  # the top-level held-out metrics are the last epoch's
    assert (summary["accuracy"], summary["test_macro_f1"], summary["eval_loss"]) == (
        last["accuracy"], last["test_macro_f1"], last["eval_loss"])
    assert summary["train_loss_last_epoch"] == last["train_loss"]


def test_held_out_at_end_reports_the_numbers_of_evaluating_at_each_new_best(finetune: ModuleType, tiny_model: Path,
                                                                            tmp_path: Path) -> None:
    """--held_out_at end evaluates the held-out sets on the last weights and on the restored copy of the
    best-dev epoch's: the same numbers as evaluating them during training, whose dropout draws the
    evaluations leave alone (the dev curves agree bit for bit; no --seed: the passes draw from the
    global random stream, seeded by --train_seed)."""
    train, test = write_reviews(tmp_path / "reviews.csv", 100), write_reviews(tmp_path / "more.csv", 12)
    args = ["--model", str(tiny_model), "--train_file", str(train), "--test_file", str(test), "--text_column",
            "review", "--label_column", "stars", "--train_size", "0", "--dev_size", "16", "--epochs", "4",
            "--batch_size", "16", "--max_length", "32", "--lr", "3e-3"]
    during, at_end = (finetune.main([*args, "--held_out_at", when]) for when in ("new_best", "end"))
    assert during["best_dev_epoch"] == at_end["best_dev_epoch"] < 4  # the copy is what gets evaluated
    assert at_end["at_best_dev_epoch"] == during["at_best_dev_epoch"] != {
        key: at_end[key] for key in at_end["at_best_dev_epoch"]}  # not the last weights'
    for key in ("accuracy", "eval_loss", "test_accuracy", "train_loss_last_epoch"):
        assert at_end[key] == during[key]
    dev = [{key: value for key, value in row.items() if key.startswith("dev_") or key == "train_loss"}
           for row in during["epoch_history"]]
    assert dev == [{key: value for key, value in row.items() if key.startswith("dev_") or key == "train_loss"}
                   for row in at_end["epoch_history"]]
    evaluated = [row["epoch"] for row in at_end["epoch_history"] if "accuracy" in row]
    assert evaluated == sorted({at_end["best_dev_epoch"], 4})  # the held-out sets ran twice at the end, no more


@pytest.mark.parametrize("argv, message", [
    (["--task", "nosuch"], "unknown --task 'nosuch': expected one of glue-cola"),
    (["--model", "/missing/path"], "--model /missing/path: no such folder"),
    (["--lr", "-1"], "--lr must be a learning rate >= 0, got -1.0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--batch_size", "-2"], "--batch_size must be >= 1, got -2"),
    (["--dev_size", "-1"], "--dev_size must be >= 0"),
    (["--train_file", "missing.csv"], "--train_file missing.csv: no such file"),
    (["--task", "vader-movie", "--dataset_name", "imdb"], "give --task (and --glue_dir) or your own data"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--held_out_at", "end"], "--held_out_at end needs a dev split to pick the epoch by (--dev_size N)"),
    (["--held_out_at", "end", "--dev_size", "8", "--save_dir", "ckpt"], "--held_out_at end keeps the best-dev"),
])
def test_launcher_mistakes_are_one_line(finetune: ModuleType, capsys: pytest.CaptureFixture, argv: list[str],
                                        message: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        finetune.main(argv)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finetune.py: error: {message}"), lines


def test_loading_mistakes_are_one_line(finetune: ModuleType, tiny_model: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    train = write_reviews(tmp_path / "reviews.csv", 20)
    with pytest.raises(SystemExit, match=f"^finetune.py: error: {train}: no column 'text' \\(--text_column\\); "
                                         "its columns: review, stars$"):
        finetune.main(["--model", str(tiny_model), "--train_file", str(train), "--text_column", "text"])
    with pytest.raises(SystemExit, match="^finetune.py: error: cannot split 30 dev rows \\(--dev_size\\) off 18 train"):
        finetune.main(["--model", str(tiny_model), "--train_file", str(train), "--text_column", "review",
                       "--label_column", "stars", "--dev_size", "30"])
    with pytest.raises(SystemExit, match="^finetune.py: error: --model nobody/nothing: [^\\n]*$"):  # one line
        finetune.main(["--model", "nobody/nothing", "--train_file", str(train), "--text_column", "review",
                       "--label_column", "stars"])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(SystemExit, match="^finetune.py: error: GLUE rte: .*pass data_dir \\(finetune.py: --glue_dir\\)"):
        finetune.main(["--model", str(tiny_model), "--task", "glue-rte"])
