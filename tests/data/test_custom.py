"""Users' own data (bidrop_ds/data/custom.py): every file format, the label kinds and their metrics,
the seeded validation split, a local folder as --dataset_name, and the errors that name the file,
the row, the column and the columns there are."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import datasets
import pandas
import pytest

from bidrop_ds.data import DataSource, load_custom

ROWS = [{"premise": f"a premise number {i}", "hypothesis": f"hypothesis {i}", "verdict": ["yes", "no", "maybe"][i % 3],
         "score": i / 4} for i in range(20)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """`rows` in the format of `path`'s suffix (csv/tsv with a header, json array, jsonl, parquet)."""
    frame = pandas.DataFrame(rows)
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        frame.to_csv(path, sep="," if suffix == ".csv" else "\t", index=False)
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_format_gives_the_same_pair_classification_task(tmp_path: Path, suffix: str) -> None:
    source = DataSource(train_file=str(write_rows(tmp_path / f"nli{suffix}", ROWS)),
                        text_column=("premise", "hypothesis"), label_column="verdict")
    task = load_custom(source)
    assert task.name == "nli"
    assert task.spec.text_columns == ("premise", "hypothesis") and not task.spec.is_regression
    assert task.spec.label_names == ("maybe", "no", "yes")  # sorted class names; id = position
    assert task.spec.id2label == {0: "maybe", 1: "no", 2: "yes"} and task.spec.label2id["yes"] == 2
    assert task.spec.metrics == ("accuracy", "macro_f1")  # three classes: no MCC
    assert list(task.evals) == ["validation"]
    train, validation = task.train, task.evals["validation"]
    assert (len(train), len(validation)) == (18, 2)  # round(0.1 x 20) held out
    assert set(train["premise"]).isdisjoint(validation["premise"])
    by_premise = {row["premise"]: row for row in ROWS}
    for row in [*train, *validation]:
        original = by_premise[row["premise"]]
        assert (row["hypothesis"], task.spec.label_names[row["label"]]) == (original["hypothesis"], original["verdict"])
    again = load_custom(source).evals["validation"]
    assert again["premise"] == validation["premise"]  # seeded: the same rows every time


def test_float_labels_mean_regression_and_binary_labels_get_mcc(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", [{"text": row["premise"], "label": row["score"]} for row in ROWS])
    regression = load_custom(DataSource(train_file=str(train), validation_split=0.25))
    assert regression.spec.is_regression and regression.spec.num_labels == 1
    assert regression.spec.metrics == ("pearson", "spearman") and regression.spec.id2label == {}
    assert regression.train.features["label"].dtype == "float32" and len(regression.evals["validation"]) == 5
    binary = [{"sentence": row["premise"], "label": [3, 7][i % 2]} for i, row in enumerate(ROWS)]
    validation = write_rows(tmp_path / "dev.jsonl", binary[:4])
    test = write_rows(tmp_path / "test.parquet", binary[4:10])
    task = load_custom(DataSource(train_file=str(write_rows(tmp_path / "train.jsonl", binary)),
                                  validation_file=str(validation), test_file=str(test)))
    assert task.spec.text_columns == ("sentence",)  # guessed
    assert task.spec.label_names == ("3", "7") and task.spec.metrics == ("accuracy", "macro_f1", "mcc")
    assert list(task.evals) == ["validation", "test"] and len(task.train) == 20  # nothing split off
    assert task.evals["test"]["label"] == [0, 1, 0, 1, 0, 1]


def test_a_local_folder_as_dataset_name_keeps_class_labels_and_drops_an_unlabelled_test_split(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    folder = tmp_path / "reviews"
    folder.mkdir()
    for split, size, labels in (("train", 12, [0, 1]), ("validation", 4, [0, 1]), ("test", 3, [-1])):
        rows = {"text": [f"{split} review {i}" for i in range(size)], "label": [labels[i % len(labels)] for i in range(size)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / f"{split}.parquet")
    with caplog.at_level(logging.WARNING, logger="bidrop_ds.data.custom"):
        task = load_custom(DataSource(dataset_name=str(folder)))
    assert task.name == "reviews" and task.spec.label_names == ("neg", "pos")
    assert (len(task.train), list(task.evals), len(task.evals["validation"])) == (12, ["validation"], 4)
    assert any("test split has no labels" in message for message in caplog.messages)


def test_mistakes_name_the_file_the_row_and_the_columns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"review": f"review {i}", "stars": ["good", "bad"][i % 2]} for i in range(10)]
    train = str(write_rows(tmp_path / "train.csv", rows))
    with pytest.raises(ValueError, match=re.escape(f"{train}: no column 'text' (--text_column); its columns: "
                                                   "review, stars")):
        load_custom(DataSource(train_file=train, text_column=("text",), label_column="stars"))
    with pytest.raises(ValueError, match="no --text_column given and none of text, sentence, sentence1 \\+ sentence2"):
        load_custom(DataSource(train_file=train, label_column="stars"))
    unseen = str(write_rows(tmp_path / "dev.csv", [*rows[:2], {"review": "new", "stars": "meh"}]))
    with pytest.raises(ValueError, match=re.escape(f"{unseen}: row 3: label 'meh' is not a class of the train rows "
                                                   "(bad, good) in column 'stars'")):
        load_custom(DataSource(train_file=train, validation_file=unseen, text_column=("review",), label_column="stars"))
    empty = tmp_path / "empty_text.csv"
    empty.write_text("review,stars\nfine,good\n,bad\nok,bad\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: row 2: empty 'review'; fix or delete that row")):
        load_custom(DataSource(train_file=str(empty), text_column=("review",), label_column="stars"))
    with caplog.at_level(logging.WARNING):
        kept = load_custom(DataSource(train_file=str(empty), text_column=("review",), label_column="stars"),
                           bad_rows="skip")
    assert len(kept.train) + len(kept.evals["validation"]) == 2
    assert f"skipped 1 malformed row in {empty} (first at row 2: empty 'review')" in caplog.messages
    too_long = tmp_path / "too_long.csv"
    too_long.write_text("review,stars\nfine,good\nok,bad,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"--train_file {too_long}: cannot read it as csv (.csv): "
                                                   "Error tokenizing data. C error: Expected 2 fields in line 3, saw 3")):
        load_custom(DataSource(train_file=str(too_long), text_column=("review",), label_column="stars"))
    one_class = str(write_rows(tmp_path / "one.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]))
    with pytest.raises(ValueError, match="has 1 class \\(x\\); classification needs at least 2"):
        load_custom(DataSource(train_file=one_class))


@pytest.mark.parametrize("fields, message", [
    ({}, "needs --train_file FILE or --dataset_name NAME"),
    ({"train_file": "x.csv", "dataset_name": "glue"}, "not both"),
    ({"dataset_name": "glue", "test_file": "t.csv"}, "go with --train_file, not with --dataset_name"),
    ({"train_file": "missing.csv"}, "--train_file missing.csv: no such file"),
    ({"train_file": "notes.txt"}, "unknown file type .txt; expected one of .csv, .tsv, .json, .jsonl, .parquet"),
    ({"dataset_name": "glue", "text_column": ("a", "b", "c")}, "one column or two"),
    ({"dataset_name": "glue", "validation_split": 1.0}, "fraction in \\(0, 1\\)"),
])
def test_bad_sources_are_refused_at_construction(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataSource(**fields)


def test_an_unreachable_hub_data_set_says_so_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(ValueError, match="--dataset_name nobody/nothing: cannot load it: .*offline .*loads only "
                                         "from the datasets cache"):
        load_custom(DataSource(dataset_name="nobody/nothing"))


def test_to_argv_gives_the_flags_back(tmp_path: Path) -> None:
    train = str(write_rows(tmp_path / "t.csv", ROWS))
    source = DataSource(train_file=train, text_column=("premise", "hypothesis"), label_column="verdict")
    assert source.to_argv() == ["--train_file", train, "--text_column", "premise", "hypothesis",
                                "--label_column", "verdict"]
