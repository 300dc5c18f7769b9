"""The task suite of the strategies-comparison harness: one registry, `load_task(name) -> Task`.

Every task has one train split and one or more held-out sets (`Task.evals`, ordered; the first is
the headline set). All splits are deterministic: the VADER ones come from
`bidrop_ds.data.vader.sentiment_splits` (seeded shuffle with seed 0, 80/10/10, rule in that
module), the subsets below from `random.Random(SUBSET_SEED = 0)`.

- `glue-{cola,sst2,mrpc,rte,stsb}`: GLUE train, eval = validation (the GLUE dev set), from the hub
  or from a folder of the official TSV files (`glue_dir`). Metrics: CoLA MCC; SST-2, RTE accuracy;
  MRPC F1 (of class 1, "equivalent") and accuracy; STS-B Pearson and Spearman.
- `vader-{movie,tweets,amazon,nyt}`: binary sentiment by the sign of the mean rating (|rating| <
  0.5 dropped), train / eval = test: movie 8,058 / 1,007; tweets 2,746 / 343; amazon 2,389 / 298;
  nyt 2,376 / 297. Metric: accuracy.
- `vader-movie-regression`: the mean human rating in [-4, 4] (float label) of every movie snippet:
  no |rating| filter (near-neutral ratings are informative for regression, only their sign is
  not), so its split (same rule, all 10,605 rows) is 8,485 / 1,060 (test) and is NOT the split of
  `vader-movie`: do not compare across the two. Metrics: Pearson, Spearman (as STS-B).
- `vader-transfer`: train on the `vader-movie` train split (8,058); evals: movie test (1,007), then
  the test splits of tweets (343), amazon (298), nyt (297), i.e. exactly the held-out sets of
  `vader-<domain>`, so out-of-domain accuracy compares with in-domain accuracy on the same rows.
  Metric: accuracy.
- `vader-movie-lowres-{250,500,1000}`: `vader-movie` with N train examples, stratified by class:
  round(N x the train split's positive fraction) positives (124 / 247 / 494), the rest negatives,
  each the first ones of that class in one seeded shuffle, so the subsets are nested (250 in 500
  in 1000). Eval = movie test (1,007). Metric: accuracy.
- `vader-movie-imbalanced`: `vader-movie` whose train split keeps all 4,076 negatives and a seeded
  sample of floor(4,076 / 4) = 1,019 of its 3,982 positives (positive:negative = 1:4, 5,095 rows);
  eval = the balanced movie test split (1,007, 503 positive). Metrics: F1 of the positive (the
  minority) class, which is what an imbalance hurts, then accuracy.

Within a split, examples keep the order of the source split (the loaders shuffle).

A dev split for model selection (`dev_split`, finetune.py --dev_size N) is carved off a task's train
split: N rows drawn by `random.Random(DEV_SEED = 0)`, the same for every training seed, so it is
disjoint from every held-out set (those are other splits) and from the rows trained on.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import datasets

from bidrop_ds.data.glue import TASKS as GLUE_TASKS
from bidrop_ds.data.glue import TaskSpec, load_glue
from bidrop_ds.data.text import check_bad_rows
from bidrop_ds.data.vader import DOMAINS, sentiment_splits

SUBSET_SEED = 0  # the low-resource and imbalanced train subsets
DEV_SEED = 0  # the dev rows carved off a train split (`dev_split`, finetune.py --dev_size)
LOWRES_SIZES = (250, 500, 1000)
IMBALANCE = 4  # negatives per positive in vader-movie-imbalanced

SENTIMENT = TaskSpec(("text",), 2, False, ("accuracy",), ("negative", "positive"))
RATING = TaskSpec(("text",), 1, True, ("pearson", "spearman"))
IMBALANCED = TaskSpec(("text",), 2, False, ("f1", "accuracy"), ("negative", "positive"))


@dataclass(frozen=True)
class Task:
    """A loaded task: train split, ordered held-out sets (the first is the headline) and spec."""

    name: str
    train: datasets.Dataset
    evals: dict[str, datasets.Dataset]
    spec: TaskSpec


class _Sources(NamedTuple):
    """Where the data come from and what to do with malformed rows (the `load_task` arguments)."""

    glue_dir: str | os.PathLike[str] | None
    cache_dir: str | os.PathLike[str] | None
    bad_rows: str


_Parts = tuple[datasets.Dataset, dict[str, datasets.Dataset], TaskSpec]


def _glue(task: str, sources: _Sources) -> _Parts:
    splits = load_glue(task, sources.glue_dir, bad_rows=sources.bad_rows)
    return splits["train"], {"validation": splits["validation"]}, GLUE_TASKS[task]


def _vader(domain: str, sources: _Sources, min_abs_rating: float = 0.5) -> datasets.DatasetDict:
    return sentiment_splits(domain, min_abs_rating=min_abs_rating, cache_dir=sources.cache_dir,
                            bad_rows=sources.bad_rows)


def _vader_sentiment(domain: str, sources: _Sources) -> _Parts:
    splits = _vader(domain, sources)
    return splits["train"], {"test": splits["test"]}, SENTIMENT


def _vader_movie_regression(sources: _Sources) -> _Parts:
    splits = _vader("movie", sources, min_abs_rating=0.0).remove_columns("label").rename_column("rating", "label")
    return splits["train"], {"test": splits["test"]}, RATING


def _vader_transfer(sources: _Sources) -> _Parts:
    movie = _vader("movie", sources)
    others = {domain: _vader(domain, sources)["test"] for domain in DOMAINS if domain != "movie"}
    return movie["train"], {"movie": movie["test"], **others}, SENTIMENT


def _vader_movie_lowres(size: int, sources: _Sources) -> _Parts:
    splits = _vader("movie", sources)
    return stratified_subset(splits["train"], size, SUBSET_SEED), {"test": splits["test"]}, SENTIMENT


def _vader_movie_imbalanced(sources: _Sources) -> _Parts:
    splits = _vader("movie", sources)
    return imbalanced_subset(splits["train"], IMBALANCE, SUBSET_SEED), {"test": splits["test"]}, IMBALANCED


TASK_REGISTRY: dict[str, Callable[[_Sources], _Parts]] = {
    **{f"glue-{task}": partial(_glue, task) for task in GLUE_TASKS},
    **{f"vader-{domain}": partial(_vader_sentiment, domain) for domain in DOMAINS},
    "vader-movie-regression": _vader_movie_regression,
    "vader-transfer": _vader_transfer,
    **{f"vader-movie-lowres-{size}": partial(_vader_movie_lowres, size) for size in LOWRES_SIZES},
    "vader-movie-imbalanced": _vader_movie_imbalanced,
}


def load_task(name: str, glue_dir: str | os.PathLike[str] | None = None,
              cache_dir: str | os.PathLike[str] | None = None, bad_rows: str = "error") -> Task:
    """The task `name` of `TASK_REGISTRY` (splits in the module doc).

    `glue_dir`: a folder of official GLUE TSV task folders (default: the hub); `cache_dir`: the
    VADER cache (default `$BIDROP_DATA_DIR` or `~/.cache/bidrop_ds/vader`); `bad_rows`: "error"
    (raise at a malformed row, naming file and line) or "skip" (drop it and log a count).
    """
    if name not in TASK_REGISTRY:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_REGISTRY)}")
    train, evals, spec = TASK_REGISTRY[name](_Sources(glue_dir, cache_dir, check_bad_rows(bad_rows)))
    return Task(name, train, evals, spec)


def stratified_subset(split: datasets.Dataset, size: int, seed: int) -> datasets.Dataset:
    """`size` examples of `split` with its class proportions (largest remainder rounding): the first
    ones of each class in a seeded shuffle of that class, so a smaller subset lies inside a larger
    one. Kept in the split's order."""
    if not 1 <= size <= len(split):
        raise ValueError(f"cannot take {size} train examples from a split of {len(split)}; "
                         f"use a size from 1 to {len(split)}")
    by_class = _indices_by_class(split["label"])
    exact = {label: size * len(indices) / len(split) for label, indices in by_class.items()}
    counts = {label: math.floor(share) for label, share in exact.items()}
    by_remainder = sorted(exact, key=lambda label: (counts[label] - exact[label], label))
    for label in by_remainder[: size - sum(counts.values())]:
        counts[label] += 1
    rng = random.Random(seed)
    chosen = []
    for label, indices in by_class.items():
        rng.shuffle(indices)
        chosen += indices[: counts[label]]
    return split.select(sorted(chosen))


def split_off(split: datasets.Dataset, size: int, seed: int,
              what: str = "rows") -> tuple[datasets.Dataset, datasets.Dataset]:
    """(the rest, `size` rows of `split` drawn by `random.Random(seed)`), disjoint, each in the
    split's order: the same seed and split always give the same part. `what` names the part in the
    error raised when it would leave the rest empty."""
    if not 1 <= size < len(split):
        raise ValueError(f"cannot split {size} {what} off {len(split)} train examples (at least one must stay "
                         f"for training); use from 1 to {len(split) - 1}")
    part = set(random.Random(seed).sample(range(len(split)), size))
    return (split.select([i for i in range(len(split)) if i not in part]), split.select(sorted(part)))


def dev_split(train: datasets.Dataset, size: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(the train rows left, `size` dev rows) of a task's train split, drawn with `DEV_SEED` (so every
    training seed gets the same dev rows). Disjoint from every held-out set, since those are other
    splits; finetune.py --dev_size takes its train subset (--train_size) from the rows left."""
    return split_off(train, size, DEV_SEED, "dev rows (--dev_size)")


def imbalanced_subset(split: datasets.Dataset, ratio: int, seed: int) -> datasets.Dataset:
    """All negatives (label 0) of `split` and a seeded sample of floor(negatives / ratio) of its
    positives (label 1): positive:negative = 1:ratio. Kept in the split's order."""
    by_class = _indices_by_class(split["label"])
    negatives, positives = by_class.get(0, []), by_class.get(1, [])
    keep = len(negatives) // ratio
    if not 1 <= keep <= len(positives):
        raise ValueError(f"a 1:{ratio} positive:negative train split needs {keep} positives for "
                         f"{len(negatives)} negatives (at least 1), but the split has {len(positives)} positives")
    random.Random(seed).shuffle(positives)
    return split.select(sorted(negatives + positives[:keep]))


def _indices_by_class(labels: list[int]) -> dict[int, list[int]]:
    """Row indices of each label, labels in increasing order."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    return dict(sorted(by_class.items()))
