"""Users' own data sets as a `Task`: files (csv, tsv, json, jsonl, parquet) or a `datasets` data set
from the hub, in the way of transformers' `run_classification.py`.

- Files (`train_file`, optional `validation_file`, `test_file`) are read with `datasets` by their
  suffix: `.csv` (comma-separated) and `.tsv` (tab-separated), each with a header line and pandas
  quoting (fields may be quoted with `"`; a line with more fields than the header is an error);
  `.json` (one array of objects, or JSON lines) and `.jsonl`; `.parquet`.
- `dataset_name` (optional `dataset_config`) is `datasets.load_dataset(name, config)`: a hub data set
  (offline, `HF_DATASETS_OFFLINE=1`, from the datasets cache) or a local folder of data files. Its
  train, validation and test splits are used; a held-out split whose labels are all missing (-1 or
  empty, as hub test splits often are) is left out with a warning.
- `text_column`: one column or two (a sentence pair); default the first of `text`, `sentence`,
  `sentence1` + `sentence2` that the train split has. `label_column`: default `label`.
- The label kind comes from the train split's label column type: floats mean regression (metrics
  Pearson, Spearman); class names (strings), integers or booleans mean classification, with the
  classes = the train split's distinct values in sorted order (class i is the i-th; a hub ClassLabel
  keeps its own names and ids). `TaskSpec.label_names` holds the mapping (`id2label`). Metrics:
  accuracy and macro-F1, plus MCC when there are two classes. A CSV label column with an empty cell
  is read as floats (pandas), i.e. as regression: the empty cell is then reported as a missing label.
- Held-out sets, in order: `validation` (the file or split; without one, a seeded split of the train
  rows: round(`validation_split` x rows), at least 1, drawn by `random.Random(VALIDATION_SEED)`, the
  same for every training seed), then `test` if given. Validation is the headline set.
- A malformed row (an empty text, a missing label, a regression label that is not a finite number, a
  held-out label the train split has no class for) stops loading with "FILE: row N: what is wrong"
  (N counts the data rows from 1), or with `bad_rows="skip"` is dropped and counted in one warning.
- Other mistakes (a missing file, an unknown suffix, a missing column, an unreadable file, a hub data
  set that cannot be reached) raise an error naming the file, the column and the columns there are.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import pandas

from bidrop_ds.data.glue import TaskSpec
from bidrop_ds.data.tasks import Task, split_off
from bidrop_ds.data.text import MalformedRows, check_bad_rows

VALIDATION_SEED = 0  # the validation rows split off a train file that comes without one
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {  # file suffix -> (datasets builder, its options)
    ".csv": ("csv", {"index_col": False}),
    ".tsv": ("csv", {"delimiter": "\t", "index_col": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
GUESSED_TEXT_COLUMNS = (("text",), ("sentence",), ("sentence1", "sentence2"))

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    """Where a user's data set comes from and which columns hold what; the fields are finetune.py's
    (and run_suite.py's) flags of the same names. Checked at construction (ValueError naming the flag)."""

    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    dataset_name: str | None = None
    dataset_config: str | None = None
    text_column: tuple[str, ...] = ()  # () = guess (module doc)
    label_column: str = "label"
    validation_split: float = 0.1  # of the train rows, when there is no validation file or split

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_column", tuple(self.text_column))
        if self.train_file is not None and self.dataset_name is not None:
            raise ValueError("give your data as --train_file FILE (optionally --validation_file, --test_file) "
                             "or as --dataset_name NAME (optionally --dataset_config), not both")
        if self.train_file is None and self.dataset_name is None:
            raise ValueError("your own data needs --train_file FILE or --dataset_name NAME")
        if self.dataset_name is not None and (self.validation_file or self.test_file):
            raise ValueError("--validation_file and --test_file go with --train_file, not with --dataset_name "
                             "(its own validation and test splits are used)")
        if self.dataset_config is not None and self.dataset_name is None:
            raise ValueError("--dataset_config goes with --dataset_name")
        if not 1 <= len(self.text_column) <= 2 and self.text_column:
            raise ValueError(f"--text_column takes one column or two (a sentence pair), got {len(self.text_column)}")
        if self.label_column in self.text_column:
            raise ValueError(f"--label_column {self.label_column} is also a --text_column")
        if not 0 < self.validation_split < 1:
            raise ValueError(f"--validation_split must be a fraction in (0, 1), got {self.validation_split}")
        for flag, path in self.files().items():
            if Path(path).suffix.lower() not in FORMATS:
                raise ValueError(f"{flag} {path}: unknown file type {Path(path).suffix or '(no suffix)'}; "
                                 f"expected one of {', '.join(FORMATS)}")
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")

    def files(self) -> dict[str, str]:
        """{flag: path} of the files given."""
        return {f"--{name}": getattr(self, name) for name in ("train_file", "validation_file", "test_file")
                if getattr(self, name) is not None}

    @property
    def name(self) -> str:
        """What the data set is called in reports: the train file's stem, or the last part of the
        data set's name (a hub id `org/name` or a folder) with `-config` when one is given."""
        if self.train_file is not None:
            return Path(self.train_file).stem
        return Path(self.dataset_name.rstrip("/")).name + (f"-{self.dataset_config}" if self.dataset_config else "")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataSource | None:
        """From the flags of `add_data_arguments`; None when none of them was given."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        return cls(**given) if given else None

    def to_argv(self) -> list[str]:
        """The flags that give this source to finetune.py (the fields that differ from the defaults)."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                argv += [f"--{f.name}", *(value if isinstance(value, tuple) else [str(value)])]
        return argv


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Register one flag per `DataSource` field (same names); unset flags stay None. Each help text
    names its default itself ("%(default).0s" keeps argparse's ArgumentDefaultsHelpFormatter from
    adding the flag's None)."""
    group = parser.add_argument_group("your own data (instead of --task; bidrop_ds/data/custom.py)")
    group.add_argument("--train_file", metavar="FILE", help=f"train rows: {', '.join(FORMATS)}%(default).0s")
    group.add_argument("--validation_file", metavar="FILE", help="held-out rows, the headline set (default: "
                       "--validation_split of the train file)%(default).0s")
    group.add_argument("--test_file", metavar="FILE", help="more held-out rows, reported after validation%(default).0s")
    group.add_argument("--dataset_name", metavar="NAME", help="a datasets data set: a hub id (offline: from the "
                       "cache) or a local folder%(default).0s")
    group.add_argument("--dataset_config", metavar="NAME", help="its configuration (subset) name%(default).0s")
    group.add_argument("--text_column", nargs="+", metavar="COLUMN",
                       help="one text column, or two for sentence pairs (default: text, sentence, or "
                            "sentence1 sentence2, whichever the train rows have)%(default).0s")
    group.add_argument("--label_column", metavar="COLUMN", help="the label column (default: label); "
                       "floats mean regression, class names or integers classification%(default).0s")
    group.add_argument("--validation_split", type=float, metavar="FRACTION",
                       help=f"without a validation file or split: this fraction of the train rows, drawn with "
                            f"seed {VALIDATION_SEED}, is held out as validation "
                            f"(default: {DataSource.validation_split})%(default).0s")


def load_custom(source: DataSource, bad_rows: str = "error") -> Task:
    """The user's data set as a Task (rules in the module doc): train, held-out `validation` (then
    `test`), and a TaskSpec with the text columns, the label kind, the class names and the metrics."""
    check_bad_rows(bad_rows)
    raw = _read_hub(source) if source.dataset_name is not None else {
        split: (_read_file(path, flag), path) for flag, path in source.files().items()
        for split in [flag.removeprefix("--").removesuffix("_file")]}
    train, train_origin = raw["train"]
    text_columns = source.text_column or _guess_text_columns(train, train_origin)
    for data, origin in raw.values():
        for column, flag in [*((c, "--text_column") for c in text_columns), (source.label_column, "--label_column")]:
            if column not in data.column_names:
                raise ValueError(f"{origin}: no column {column!r} ({flag}); its columns: {', '.join(data.column_names)}")
    label_names, to_label = _label_kind(train, source.label_column, train_origin)
    clean = {split: _clean(data, origin, text_columns, source.label_column, label_names, to_label, bad_rows)
             for split, (data, origin) in raw.items()}
    if "validation" not in clean:
        count = max(1, round(source.validation_split * len(clean["train"])))
        clean["train"], clean["validation"] = split_off(clean["train"], count, VALIDATION_SEED, "validation rows")
    if label_names is None:
        spec = TaskSpec(text_columns, 1, True, ("pearson", "spearman"))
    else:
        metrics = ("accuracy", "macro_f1", "mcc") if len(label_names) == 2 else ("accuracy", "macro_f1")
        spec = TaskSpec(text_columns, len(label_names), False, metrics, label_names)
    evals = {split: clean[split] for split in ("validation", "test") if split in clean}
    return Task(source.name, clean["train"], evals, spec)


def _read_file(path: str, flag: str) -> datasets.Dataset:
    """One data file as a Dataset (its format from its suffix); an unreadable file raises ValueError
    naming it and the parser's complaint."""
    builder, options = FORMATS[Path(path).suffix.lower()]
    library_logger = logging.getLogger("datasets")
    level = library_logger.level
    try:
        with warnings.catch_warnings():  # pandas would drop the extra fields of a too-long line with a warning
            warnings.simplefilter("error", pandas.errors.ParserWarning)
            library_logger.setLevel(logging.CRITICAL)  # its builders log the error that we raise in one line
            return datasets.load_dataset(builder, data_files={"train": os.path.abspath(path)}, split="train", **options)
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        first = next((line for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        raise ValueError(f"{flag} {path}: cannot read it as {builder} ({Path(path).suffix}): {first}") from None
    finally:
        library_logger.setLevel(level)


def _read_hub(source: DataSource) -> dict[str, tuple[datasets.Dataset, str]]:
    """{split: (Dataset, its name in errors)} of `datasets.load_dataset(name, config)`: train, and the
    validation and test splits that it has and whose labels are not all missing."""
    described = source.dataset_name + (f" (config {source.dataset_config})" if source.dataset_config else "")
    try:
        loaded = datasets.load_dataset(source.dataset_name, source.dataset_config)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        offline = datasets.config.HF_DATASETS_OFFLINE
        hint = ("; offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), a hub data set loads only from the datasets "
                "cache: load it once online, or give its files with --train_file" if offline else "")
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ValueError(f"--dataset_name {described}: cannot load it: {first}{hint}") from None
    if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
        raise ValueError(f"--dataset_name {described}: no train split (its splits: {', '.join(loaded)})")
    raw = {"train": (loaded["train"], f"{described} train split")}
    for split in ("validation", "test"):
        if split not in loaded:
            continue
        data = loaded[split]
        feature = data.features.get(source.label_column)
        unlabelled = -1 if isinstance(feature, datasets.ClassLabel) else None  # a ClassLabel's missing label
        if feature is not None and all(_missing(value) or value == unlabelled for value in data[source.label_column]):
            logger.warning("%s: the %s split has no labels (all missing); it is not evaluated", described, split)
            continue
        raw[split] = (data, f"{described} {split} split")
    return raw


def _guess_text_columns(train: datasets.Dataset, origin: str) -> tuple[str, ...]:
    for candidate in GUESSED_TEXT_COLUMNS:
        if all(column in train.column_names for column in candidate):
            return candidate
    options = ", ".join(" + ".join(candidate) for candidate in GUESSED_TEXT_COLUMNS)
    raise ValueError(f"{origin}: no --text_column given and none of {options} is a column; name one or two "
                     f"with --text_column (its columns: {', '.join(train.column_names)})")


def _missing(value: Any) -> bool:
    """An empty label cell: None, or NaN (pandas reads an empty CSV cell of a number column so)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _label_kind(train: datasets.Dataset, column: str,
                origin: str) -> tuple[tuple[str, ...] | None, Callable[[Any], Any]]:
    """(class names in id order, or None for regression; raw label -> class id or float, raising
    ValueError with the problem for a label that is not valid)."""
    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = tuple(feature.names)

        def class_label(value: Any) -> int:
            if _missing(value) or value < 0:  # -1: the hub's "no label"
                raise ValueError("no label")
            return int(value)

        return names, class_label
    dtype = getattr(feature, "dtype", None)
    if dtype in ("float16", "float32", "float64"):
        def number(value: Any) -> float:
            if _missing(value):
                raise ValueError("no label")
            if not math.isfinite(value):
                raise ValueError(f"label {value} is not a finite number")
            return float(value)

        return None, number
    if dtype is None or not (dtype == "bool" or dtype.startswith(("int", "uint")) or "string" in dtype):
        raise ValueError(f"{origin}: column {column!r} (--label_column) holds {feature}; expected class names, "
                         "integers, or floats (regression)")
    values = sorted({value for value in train[column] if value is not None})
    names = tuple(_class_name(value) for value in values)
    if len(names) < 2:
        raise ValueError(f"{origin}: column {column!r} (--label_column) has {len(names)} class"
                         f"{'' if len(names) == 1 else 'es'} ({', '.join(names)}); classification needs at least 2")
    ids = {name: index for index, name in enumerate(names)}

    def class_id(value: Any) -> int:
        if _missing(value):
            raise ValueError("no label")
        name = _class_name(value)
        if name not in ids:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ValueError(f"label {name!r} is not a class of the train rows ({shown})")
        return ids[name]

    return names, class_id


def _class_name(value: Any) -> str:
    """A class's name: the value as text, an integral float written as the integer (a held-out CSV
    column with an empty cell is read as floats, 1 -> 1.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _clean(data: datasets.Dataset, origin: str, text_columns: Sequence[str], label_column: str,
           label_names: tuple[str, ...] | None, to_label: Callable[[Any], Any], bad_rows: str) -> datasets.Dataset:
    """The text columns (as strings) and `label` (class id or float) of every valid row of `data`;
    malformed rows as `bad_rows` says; no valid row at all is always an error."""
    malformed = MalformedRows(origin, bad_rows, unit="row")
    texts = {column: data[column] for column in text_columns}
    out: dict[str, list] = {**{column: [] for column in text_columns}, "label": []}
    for row, raw_label in enumerate(data[label_column]):
        values = {column: texts[column][row] for column in text_columns}
        empty = [column for column, value in values.items() if value is None or not str(value).strip()]
        if empty:
            malformed.flag(row + 1, f"empty {' and '.join(repr(column) for column in empty)}")
            continue
        try:
            label = to_label(raw_label)
        except ValueError as problem:
            malformed.flag(row + 1, f"{problem} in column {label_column!r}")
            continue
        for column, value in values.items():
            out[column].append(str(value))
        out["label"].append(label)
    skipped = malformed.finish()
    if not out["label"]:
        raise ValueError(f"{origin}: no examples" + (f" (malformed rows skipped: {skipped})" if skipped else ""))
    label_feature = datasets.Value("float32") if label_names is None else datasets.ClassLabel(names=list(label_names))
    features = datasets.Features({**{column: datasets.Value("string") for column in text_columns},
                                  "label": label_feature})
    return datasets.Dataset.from_dict(out, features=features)
