"""Helpers shared by the data sets: reading TSV files (with a policy for malformed rows),
tokenising, batching."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import datasets
import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

Batch = dict[str, torch.Tensor]

BAD_ROWS = ("error", "skip")  # what the readers do with a malformed row

logger = logging.getLogger(__name__)


def check_bad_rows(bad_rows: str) -> str:
    """`bad_rows` if it is a known policy, else ValueError listing them."""
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows={bad_rows!r}: expected one of {', '.join(map(repr, BAD_ROWS))}")
    return bad_rows


class MalformedRows:
    """The malformed rows of one file under a `bad_rows` policy.

    "error": `flag` raises ValueError "FILE:LINE: problem" at the first one, so a corrupted file is
    never silently trained on. "skip": `flag` counts them; `finish` logs one warning (count, first
    line and reason) so that skipping is never silent either. With `unit="row"` (files read by a
    parser that does not keep line numbers: csv with quoted newlines, json, parquet) the place is
    written "FILE: row N" instead, N counting the data rows from 1 (a header is not a row).
    """

    def __init__(self, path: str | os.PathLike[str], bad_rows: str = "error", unit: str = "line") -> None:
        if unit not in ("line", "row"):
            raise ValueError(f"unit={unit!r}: expected 'line' or 'row'")
        self.path, self.policy, self.unit = path, check_bad_rows(bad_rows), unit
        self.count = 0
        self.first: tuple[int, str] | None = None  # (line or row, problem) of the first malformed row

    def where(self, number: int) -> str:
        """The place of 1-based line or row `number`: "FILE:N" or "FILE: row N"."""
        return f"{self.path}:{number}" if self.unit == "line" else f"{self.path}: row {number}"

    def flag(self, number: int, problem: str) -> None:
        """Report a malformed row at 1-based line (or row) `number`: raise ("error") or count it ("skip")."""
        if self.policy == "error":
            raise ValueError(f"{self.where(number)}: {problem}; fix or delete that {self.unit}, or skip malformed "
                             "rows with bad_rows='skip' (finetune.py: --bad_rows skip)")
        self.count += 1
        if self.first is None:
            self.first = (number, problem)

    def finish(self) -> int:
        """Log the warning for skipped rows (if any) and return how many were skipped."""
        if self.first is not None:
            number, problem = self.first
            logger.warning("skipped %d malformed row%s in %s (first at %s %d: %s)",
                           self.count, "" if self.count == 1 else "s", self.path, self.unit, number, problem)
        return self.count


def read_tsv_rows(path: str | os.PathLike[str],
                  malformed: MalformedRows | None = None) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, tab-separated fields) of each line of a UTF-8 file, in order (no
    quoting; CRLF or LF; a leading byte-order mark and one final newline are ignored).

    A line that is not valid UTF-8 goes to `malformed` (default: raise ValueError naming file and
    line); decoding line by line keeps the other lines and the line numbers. Lines are split on
    "\\n" only: `str.splitlines` would also split inside a field at characters such as \\x0b,
    \\x1c or U+2028 (and "\\n" never occurs inside a multi-byte UTF-8 character).
    """
    malformed = malformed if malformed is not None else MalformedRows(path)
    lines = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            malformed.flag(number, f"not valid UTF-8 ({raw[err.start:err.start + 1]!r} at byte {err.start + 1} "
                                   f"of the line: {err.reason})")
            continue
        yield number, line.removesuffix("\r").split("\t")


def tokenize(splits: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase,
             text_columns: Sequence[str], max_length: int) -> datasets.DatasetDict:
    """Tokenise one sentence or a pair per example (truncated to `max_length`, not padded: the
    collator pads per batch). Keeps only the model inputs and `label`."""
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"expected one or two text columns, got {list(text_columns)}")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=max_length)

    return datasets.DatasetDict({
        name: split.map(encode, batched=True, desc=f"tokenising {name}",
                        remove_columns=[c for c in split.column_names if c != "label"])
        for name, split in splits.items()
    })


def collator(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], Batch]:
    """Pads a list of tokenised examples to the longest one; returns tensors `input_ids`,
    `attention_mask` (and `token_type_ids` for BERT-style models) and `labels` (long for classes,
    float for regression)."""
    pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(examples: list[dict]) -> Batch:
        return dict(pad(examples))  # a plain dict, not transformers' BatchEncoding

    return collate


def split_batch(batch: Batch, chunks: int) -> list[Batch]:
    """Cut a batch into `chunks` micro-batches along the first dimension (sizes differ by at most
    one when the batch size is not a multiple of `chunks`)."""
    size = len(batch["input_ids"])
    if not 1 <= chunks <= size:
        raise ValueError(f"cannot split a batch of {size} into {chunks} chunks")
    pieces = {name: torch.tensor_split(tensor, chunks) for name, tensor in batch.items()}
    return [{name: parts[i] for name, parts in pieces.items()} for i in range(chunks)]
