"""Data for the Bi-Drop demos and experiments: VADER human-rated sentiment (offline, from PyPI),
GLUE (hub or official TSV files), the task suite built on them (`load_task`), users' own files or
hub data sets (`load_custom`), and tokenisation/batching helpers."""

from bidrop_ds.data.custom import DataSource, add_data_arguments, load_custom
from bidrop_ds.data.glue import TASKS, TaskSpec, compute_metrics, load_glue
from bidrop_ds.data.tasks import TASK_REGISTRY, Task, load_task
from bidrop_ds.data.text import BAD_ROWS, MalformedRows, collator, split_batch, tokenize
from bidrop_ds.data.vader import ensure_vader_data, read_ratings, sentiment_splits

__all__ = [
    "BAD_ROWS", "DataSource", "MalformedRows", "TASKS", "TASK_REGISTRY", "Task", "TaskSpec", "add_data_arguments",
    "collator", "compute_metrics", "ensure_vader_data", "load_custom", "load_glue", "load_task", "read_ratings",
    "sentiment_splits", "split_batch", "tokenize",
]
