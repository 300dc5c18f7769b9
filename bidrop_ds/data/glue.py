"""GLUE tasks used by Bi-Drop (CoLA, SST-2, MRPC, RTE, STS-B): loading and metrics.

`load_glue(task)` reads the hub copy (`nyu-mll/glue`, needs internet); `load_glue(task, data_dir)`
reads the official GLUE TSV files (`<data_dir>/<CoLA|SST-2|MRPC|RTE|STS-B>/{train,dev}.tsv`, as the
GLUE download script writes them) into the hub's columns and label encoding, so both paths feed
the same code. `compute_metrics` gives the GLUE metrics without scipy/sklearn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import datasets
import numpy as np

from bidrop_ds.data.text import MalformedRows, check_bad_rows, read_tsv_rows


@dataclass(frozen=True)
class TaskSpec:
    """What a training script needs to know about a task."""

    text_columns: tuple[str, ...]  # one sentence or a pair, fed to the tokenizer in this order
    num_labels: int  # 1 for regression
    is_regression: bool
    metrics: tuple[str, ...]  # keys of `compute_metrics`; the first is the headline number
    label_names: tuple[str, ...] = ()  # class names in label order (hub ClassLabel), empty for regression

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> name, as a model config's `id2label` holds it (empty for regression)."""
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        """Class name -> id, as a model config's `label2id` holds it (empty for regression)."""
        return {name: index for index, name in enumerate(self.label_names)}


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(("sentence",), 2, False, ("mcc",), ("unacceptable", "acceptable")),
    "sst2": TaskSpec(("sentence",), 2, False, ("accuracy",), ("negative", "positive")),
    "mrpc": TaskSpec(("sentence1", "sentence2"), 2, False, ("f1", "accuracy"), ("not_equivalent", "equivalent")),
    "rte": TaskSpec(("sentence1", "sentence2"), 2, False, ("accuracy",), ("entailment", "not_entailment")),
    "stsb": TaskSpec(("sentence1", "sentence2"), 1, True, ("pearson", "spearman")),
}


class _Layout(NamedTuple):
    """Where an official GLUE task keeps its files and how they are written."""

    folder: str
    columns: dict[str, str]  # hub column -> TSV column
    header: tuple[str, ...] | None = None  # the column names when the file has no header line (CoLA)
    named_labels: bool = False  # labels written as class names (RTE), else as the class index


_LAYOUTS: dict[str, _Layout] = {
    "cola": _Layout("CoLA", {"sentence": "sentence", "label": "label"},
                    header=("source", "label", "original_label", "sentence")),
    "sst2": _Layout("SST-2", {"sentence": "sentence", "label": "label"}),
    "mrpc": _Layout("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
    "rte": _Layout("RTE", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, named_labels=True),
    "stsb": _Layout("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
}


def load_glue(task: str, data_dir: str | os.PathLike[str] | None = None,
              bad_rows: str = "error") -> datasets.DatasetDict:
    """Train and validation (GLUE dev) splits of `task`, with the hub's columns: the text columns
    of `TASKS[task]`, `label` (ClassLabel, or float32 for STS-B) and `idx`.

    Without `data_dir` this is `datasets.load_dataset("nyu-mll/glue", task)` (also has a test split
    whose labels are -1; `bad_rows` does not apply). From TSV files, a malformed row (wrong column
    count, bad label, empty text, not UTF-8) raises ValueError naming file and line, or with
    `bad_rows="skip"` is dropped and counted in a logged warning; a file without examples (an
    empty split) is always an error.
    """
    spec = task_spec(task)
    check_bad_rows(bad_rows)
    if data_dir is None:
        try:
            return datasets.load_dataset("nyu-mll/glue", task)
        except ConnectionError as err:  # offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and not cached, or no network
            raise ConnectionError(f"GLUE {task}: {err}; pass data_dir (finetune.py: --glue_dir) = a folder of the "
                                  "official GLUE TSV files, or load it once online to fill the datasets cache") from None
    folder = Path(data_dir) / _LAYOUTS[task].folder
    return datasets.DatasetDict({split: _read_tsv(task, spec, folder / f"{stem}.tsv", split, bad_rows)
                                 for split, stem in (("train", "train"), ("validation", "dev"))})


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[task]


def _read_tsv(task: str, spec: TaskSpec, path: Path, split: str, bad_rows: str) -> datasets.Dataset:
    """One official GLUE TSV file (tab-separated, no quoting) as a Dataset; malformed rows as
    `bad_rows` says (`load_glue`), a missing or bad header and an empty split always raise."""
    if not path.is_file():
        raise FileNotFoundError(f"GLUE {task}: missing {path}")
    malformed = MalformedRows(path, bad_rows)
    rows = read_tsv_rows(path, malformed)
    layout = _LAYOUTS[task]
    header, columns = layout.header, layout.columns
    if header is None:
        first = next(rows, None)
        if first is None or first[0] != 1:  # an empty file, or line 1 skipped as not UTF-8
            raise ValueError(f"{path}:1: expected a header line naming the columns ({', '.join(columns.values())}), "
                             f"found {'an empty file' if first is None else 'a line that is not valid UTF-8'}")
        header = tuple(first[1])
        missing = [c for c in columns.values() if c not in header]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)}; found {header}")
    width, index = len(header), {hub: header.index(tsv) for hub, tsv in columns.items()}
    convert, allowed = _label_parser(spec, layout.named_labels)
    data: dict[str, list] = {name: [] for name in (*spec.text_columns, "label", "idx")}
    for number, fields in rows:
        if len(fields) != width:
            malformed.flag(number, f"expected {width} tab-separated columns, found {len(fields)}")
            continue
        empty = [name for name in spec.text_columns if not fields[index[name]].strip()]
        if empty:
            malformed.flag(number, f"empty {' and '.join(empty)}")
            continue
        raw_label = fields[index["label"]]
        try:
            label = convert(raw_label)
        except ValueError:
            malformed.flag(number, f"bad label {raw_label!r} (expected {allowed})")
            continue
        for name in spec.text_columns:
            data[name].append(fields[index[name]])
        data["label"].append(label)
        data["idx"].append(len(data["idx"]))
    skipped = malformed.finish()
    if not data["idx"]:
        raise ValueError(f"{path}: no examples (the GLUE {task} {split} split is empty"
                         + (f"; malformed rows skipped: {skipped})" if skipped else ")"))
    label_feature = (datasets.Value("float32") if spec.is_regression
                     else datasets.ClassLabel(names=list(spec.label_names)))
    features = datasets.Features({**{name: datasets.Value("string") for name in spec.text_columns},
                                  "label": label_feature, "idx": datasets.Value("int32")})
    return datasets.Dataset.from_dict(data, features=features)


def _label_parser(spec: TaskSpec, named: bool) -> tuple[Callable[[str], float | int], str]:
    """(TSV label text -> hub label, what is allowed): a finite float for regression, else the
    class index, written as such or (`named`, RTE) as the class name. Bad text raises ValueError."""
    if spec.is_regression:
        def to_float(text: str) -> float:
            value = float(text)
            if not np.isfinite(value):
                raise ValueError(text)
            return value

        return to_float, "a finite number"
    names = spec.label_names if named else tuple(str(i) for i in range(spec.num_labels))
    return (lambda text: names.index(text.strip())), "one of " + ", ".join(names)


# ---- metrics -------------------------------------------------------------------------------------

def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (1); 0 when there are no positive predictions or labels."""
    tp = np.sum((predictions == 1) & (labels == 1))
    wrong = np.sum(predictions != labels)
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean over classes of each class's F1 (one class against the rest), over the classes
    that occur in the labels or the predictions (the sklearn `average="macro"` default)."""
    classes = np.union1d(predictions, labels)
    scores = []
    for cls in classes:
        tp = np.sum((predictions == cls) & (labels == cls))
        wrong = np.sum((predictions == cls) != (labels == cls))
        scores.append(2 * tp / (2 * tp + wrong))  # tp + wrong > 0: cls occurs somewhere
    return float(np.mean(scores))


def mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation of binary predictions; 0 when a row or column of the confusion matrix
    is empty (the sklearn convention)."""
    tp = float(np.sum((predictions == 1) & (labels == 1)))
    tn = float(np.sum((predictions == 0) & (labels == 0)))
    fp = float(np.sum((predictions == 1) & (labels == 0)))
    fn = float(np.sum((predictions == 0) & (labels == 1)))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (as scipy)."""
    x = predictions.astype(np.float64) - predictions.mean()
    y = labels.astype(np.float64) - labels.mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator else float("nan")


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman correlation: Pearson of the ranks, tied values sharing their average rank."""
    return pearson(_average_ranks(predictions), _average_ranks(labels))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based positions start+1 .. end
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "mcc": mcc, "pearson": pearson, "spearman": spearman,
}


def compute_metrics(task: str | TaskSpec, predictions: Sequence[float] | np.ndarray,
                    labels: Sequence[float] | np.ndarray) -> dict[str, float]:
    """The metrics of `task` (a GLUE name or a TaskSpec) for predicted labels (class indices, or
    scores for regression) against the true labels, keyed as in `TaskSpec.metrics`."""
    spec = task_spec(task) if isinstance(task, str) else task
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1 or not len(labels):
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be equal-length, "
                         "non-empty 1-D sequences (class indices, or scores for regression)")
    return {name: METRICS[name](predictions, labels) for name in spec.metrics}
