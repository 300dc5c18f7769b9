"""Helpers shared by the data sets: reading TSV files, tokenising, batching."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import datasets
import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

Batch = dict[str, torch.Tensor]


def read_tsv_rows(path: str | os.PathLike[str]) -> list[list[str]]:
    """The tab-separated fields of each line of a UTF-8 file (no quoting; CRLF or LF; a leading
    byte-order mark and one final newline are ignored). Bad UTF-8 raises ValueError naming file
    and line. Lines are split on "\\n" only: `str.splitlines` would also split inside a field at
    characters such as \\x0b, \\x1c or U+2028."""
    raw = Path(path).read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({err.reason})") from None
    lines = content.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r").split("\t") for line in lines]


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
