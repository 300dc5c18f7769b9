"""Tiny config-built models and batches for tests (no download)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 64


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    """A 2-layer BERT classifier, hidden 16, with dropout on (the Bi-Drop passes need it)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config).train()


def random_batch(seed: int, size: int = 8, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (size, length), generator=g),
            "labels": torch.randint(0, 2, (size,), generator=g)}


def split_chunks(batch: dict[str, torch.Tensor], chunks: int) -> list[dict[str, torch.Tensor]]:
    """Equal micro-batch chunks of a batch."""
    size = next(iter(batch.values())).shape[0]
    step = size // chunks
    return [{key: value[i * step:(i + 1) * step] for key, value in batch.items()} for i in range(chunks)]
