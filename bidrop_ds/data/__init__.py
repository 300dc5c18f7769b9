"""Data for the Bi-Drop demos and experiments: VADER human-rated sentiment (offline, from PyPI),
GLUE (hub or official TSV files), and tokenisation/batching helpers."""

from bidrop_ds.data.glue import TASKS, TaskSpec, compute_metrics, load_glue
from bidrop_ds.data.text import collator, split_batch, tokenize
from bidrop_ds.data.vader import ensure_vader_data, read_ratings, sentiment_splits

__all__ = [
    "TASKS", "TaskSpec", "collator", "compute_metrics", "ensure_vader_data", "load_glue",
    "read_ratings", "sentiment_splits", "split_batch", "tokenize",
]
