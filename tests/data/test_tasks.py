"""The task suite: every VADER task on the real (cached) ratings with the documented sizes, the
GLUE tasks from small TSV files, the subset rules on synthetic data, and the task metrics by hand."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import datasets
import pytest

from bidrop_ds.data import TASK_REGISTRY, Task, compute_metrics, ensure_vader_data, load_task
from bidrop_ds.data.glue import TASKS
from bidrop_ds.data.tasks import dev_split, imbalanced_subset, split_off, stratified_subset
from tests.data.test_glue import EXPECTED, FILES, write_task
from tests.data.test_vader import write_ground_truth

VADER_TASKS = [name for name in TASK_REGISTRY if name.startswith("vader-")]

# name -> (train size, train positives, {eval set: (size, positives)}) on the real ratings
SIZES = {
    "vader-movie": (8058, 3982, {"test": (1007, 503)}),
    "vader-tweets": (2746, 1878, {"test": (343, 240)}),
    "vader-amazon": (2389, 1397, {"test": (298, 177)}),
    "vader-nyt": (2376, 971, {"test": (297, 111)}),
    "vader-transfer": (8058, 3982, {"movie": (1007, 503), "tweets": (343, 240), "amazon": (298, 177),
                                    "nyt": (297, 111)}),
    "vader-movie-lowres-250": (250, 124, {"test": (1007, 503)}),
    "vader-movie-lowres-500": (500, 247, {"test": (1007, 503)}),
    "vader-movie-lowres-1000": (1000, 494, {"test": (1007, 503)}),
    "vader-movie-imbalanced": (5095, 1019, {"test": (1007, 503)}),
}


@pytest.fixture(scope="module")
def real() -> dict[str, Task]:
    """Every VADER task, loaded once from the real ratings (the local cache; pip fetches them if absent)."""
    cache = ensure_vader_data().parent
    return {name: load_task(name, cache_dir=cache) for name in VADER_TASKS}


def test_the_registry_names_every_task() -> None:
    assert list(TASK_REGISTRY) == [
        "glue-cola", "glue-sst2", "glue-mrpc", "glue-rte", "glue-stsb",
        "vader-movie", "vader-tweets", "vader-amazon", "vader-nyt", "vader-movie-regression", "vader-transfer",
        "vader-movie-lowres-250", "vader-movie-lowres-500", "vader-movie-lowres-1000", "vader-movie-imbalanced"]
    with pytest.raises(ValueError, match=re.escape("unknown task 'vader-imdb'; expected one of glue-cola, glue-sst2, ")
                       + ".*vader-movie-imbalanced"):
        load_task("vader-imdb")
    with pytest.raises(ValueError, match="bad_rows='maybe': expected one of 'error', 'skip'"):
        load_task("vader-movie", bad_rows="maybe")


@pytest.mark.parametrize("name", list(SIZES))
def test_vader_classification_tasks_have_the_documented_sizes(real: dict[str, Task], name: str) -> None:
    task = real[name]
    size, positives, evals = SIZES[name]
    assert task.name == name
    assert (len(task.train), sum(task.train["label"])) == (size, positives)
    assert {key: (len(split), sum(split["label"])) for key, split in task.evals.items()} == evals
    assert list(task.evals) == list(evals)  # the headline set first
    assert task.spec.text_columns == ("text",) and task.spec.num_labels == 2 and not task.spec.is_regression
    assert task.train.features["label"].names == ["negative", "positive"]
    assert all((rating > 0) == label for rating, label in zip(task.train["rating"], task.train["label"]))
    assert task.spec.metrics == (("f1", "accuracy") if name == "vader-movie-imbalanced" else ("accuracy",))


def test_derived_tasks_reuse_the_movie_split(real: dict[str, Task]) -> None:
    movie_train, movie_test = set(real["vader-movie"].train["id"]), real["vader-movie"].evals["test"]["id"]
    for name in ("vader-transfer", "vader-movie-lowres-250", "vader-movie-imbalanced"):
        assert real[name].evals[next(iter(real[name].evals))]["id"] == movie_test
        assert set(real[name].train["id"]) <= movie_train
    for domain in ("tweets", "amazon", "nyt"):  # transfer sets are exactly the in-domain held-out sets
        assert real["vader-transfer"].evals[domain]["id"] == real[f"vader-{domain}"].evals["test"]["id"]
    lowres = [set(real[f"vader-movie-lowres-{n}"].train["id"]) for n in (250, 500, 1000)]
    assert lowres[0] < lowres[1] < lowres[2]  # nested
    imbalanced = real["vader-movie-imbalanced"].train
    movie = real["vader-movie"].train
    negatives = [i for i, label in zip(movie["id"], movie["label"]) if not label]
    assert [i for i, label in zip(imbalanced["id"], imbalanced["label"]) if not label] == negatives  # all, in order
    assert 4 * sum(imbalanced["label"]) == len(negatives)


def test_vader_regression_task_keeps_every_rating(real: dict[str, Task]) -> None:
    task = real["vader-movie-regression"]
    assert (len(task.train), list(task.evals), len(task.evals["test"])) == (8485, ["test"], 1060)
    assert task.spec.metrics == ("pearson", "spearman") and task.spec.is_regression and task.spec.num_labels == 1
    assert task.train.column_names == ["text", "label", "id"]
    assert task.train.features["label"] == datasets.Value("float32")
    labels = [*task.train["label"], *task.evals["test"]["label"]]
    assert min(labels) >= -4 and max(labels) <= 4
    assert sum(abs(x) < 0.5 for x in labels) > 400  # the near-neutral rows the classification tasks drop


def test_tasks_load_the_same_every_time(real: dict[str, Task]) -> None:
    again = load_task("vader-movie-lowres-500", cache_dir=ensure_vader_data().parent)
    assert again.train["id"] == real["vader-movie-lowres-500"].train["id"]
    assert again.evals["test"]["id"] == real["vader-movie-lowres-500"].evals["test"]["id"]


@pytest.mark.parametrize("task", sorted(FILES))
def test_glue_tasks_load_from_tsv_files(tmp_path: Path, task: str) -> None:
    write_task(tmp_path, task)
    loaded = load_task(f"glue-{task}", glue_dir=tmp_path)
    assert (loaded.name, loaded.spec, list(loaded.evals)) == (f"glue-{task}", TASKS[task], ["validation"])
    assert loaded.train["label"] == pytest.approx(EXPECTED[task][1])
    assert loaded.evals["validation"].column_names == EXPECTED[task][0]


def test_glue_tasks_use_the_official_metrics() -> None:
    official = {"cola": ("mcc",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "rte": ("accuracy",),
                "stsb": ("pearson", "spearman")}
    assert {task: spec.metrics for task, spec in TASKS.items()} == official


def test_bad_rows_reach_the_readers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [(f"m{i}", 1.5 if i % 2 else -1.5, f"sentence {i}") for i in range(30)]
    rows[4] = ("m4", "1,5", "a decimal comma")  # line 5
    write_ground_truth(tmp_path / "vader", {"movie": rows})
    with pytest.raises(ValueError, match=r"movieReviewSnippets_GroundTruth\.txt:5: rating '1,5' is not a number"):
        load_task("vader-movie", cache_dir=tmp_path / "vader")
    with caplog.at_level(logging.WARNING, logger="bidrop_ds.data.text"):
        task = load_task("vader-movie", cache_dir=tmp_path / "vader", bad_rows="skip")
    assert len(task.train) + len(task.evals["test"]) == 29 - 2  # 29 rows: 2 validation, 2 test, 25 train
    assert caplog.messages == [re.sub(r"\s+", " ", f"""skipped 1 malformed row in
        {tmp_path / 'vader' / 'hutto_ICWSM_2014' / 'movieReviewSnippets_GroundTruth.txt'}
        (first at line 5: rating '1,5' is not a number in [-4, 4])""")]
    write_task(tmp_path / "glue", "sst2", train=["sentence\tlabel", "ok .\t1", "no label ."])
    with pytest.raises(ValueError, match=r"SST-2/train\.tsv:3: expected 2 tab-separated columns, found 1"):
        load_task("glue-sst2", glue_dir=tmp_path / "glue")
    assert len(load_task("glue-sst2", glue_dir=tmp_path / "glue", bad_rows="skip").train) == 1


def labelled(labels: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"label": labels, "row": list(range(len(labels)))})


def test_stratified_subset_keeps_proportions_nests_and_reports_bad_sizes() -> None:
    split = labelled([1, 0, 0] * 10)  # 10 positives, 20 negatives
    small, large = stratified_subset(split, 7, seed=0), stratified_subset(split, 14, seed=0)
    # 7 x 1/3 = 2.33 positives and 4.67 negatives: floors 2 + 4, the larger remainder (negatives) gets the 7th
    assert sorted(small["label"]) == [0] * 5 + [1] * 2
    assert sorted(large["label"]) == [0] * 9 + [1] * 5  # 4.67 -> 5 positives, 9.33 -> 9 negatives
    assert set(small["row"]) < set(large["row"]) and small["row"] == sorted(small["row"])
    assert stratified_subset(split, 7, seed=0)["row"] == small["row"]
    assert stratified_subset(split, 7, seed=1)["row"] != small["row"]
    with pytest.raises(ValueError, match="cannot take 31 train examples from a split of 30"):
        stratified_subset(split, 31, seed=0)


def test_split_off_and_dev_split_are_seeded_disjoint_and_ordered() -> None:
    split = labelled([0, 1] * 10)
    rest, part = (list(half["row"]) for half in split_off(split, 5, seed=3))
    assert (len(rest), len(part)) == (15, 5) and sorted(rest + part) == list(range(20))
    assert part == sorted(part) and rest == sorted(rest)
    assert list(split_off(split, 5, seed=3)[1]["row"]) == part != list(split_off(split, 5, seed=4)[1]["row"])
    train, dev = (list(half["row"]) for half in dev_split(split, 4))
    assert dev == list(dev_split(split, 4)[1]["row"]) and len(dev) == 4 and set(dev).isdisjoint(train)
    with pytest.raises(ValueError, match=r"cannot split 20 dev rows \(--dev_size\) off 20 train examples"):
        dev_split(split, 20)


def test_imbalanced_subset_keeps_all_negatives_and_a_quarter_as_many_positives() -> None:
    split = labelled([1, 0] * 10 + [0] * 2)  # 10 positives, 12 negatives
    subset = imbalanced_subset(split, 4, seed=0)
    assert [r for r, label in zip(subset["row"], subset["label"]) if not label] == [
        r for r, label in zip(split["row"], split["label"]) if not label]
    assert sum(subset["label"]) == 3 and subset["row"] == sorted(subset["row"])
    with pytest.raises(ValueError, match="needs 3 positives for 12 negatives .* but the split has 2 positives"):
        imbalanced_subset(labelled([1, 1] + [0] * 12), 4, seed=0)


def test_task_metrics_by_hand(real: dict[str, Task]) -> None:
    labels = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # a 1:4 test set
    predictions = [1, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # tp 1, fp 1, fn 1: F1 = 2 / (2 + 2) = 0.5 while accuracy is 0.8
    assert compute_metrics(real["vader-movie-imbalanced"].spec, predictions, labels) == {"f1": 0.5, "accuracy": 0.8}
    assert compute_metrics(real["vader-transfer"].spec, predictions, labels) == {"accuracy": 0.8}
    # scores (1, 3, 2) vs ratings (1, 2, 3): centred (-1, 1, 0), (-1, 0, 1): 1 / sqrt(2 x 2); ranks = values
    got = compute_metrics(real["vader-movie-regression"].spec, [1.0, 3.0, 2.0], [1.0, 2.0, 3.0])
    assert got == {"pearson": pytest.approx(0.5), "spearman": pytest.approx(0.5)}
