"""Tiny config-built models and batches for tests (no download)."""

from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, PreTrainedModel, PreTrainedTokenizerFast)

VOCAB = 64


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    """A 2-layer BERT classifier, hidden 16, with dropout on (the Bi-Drop passes need it)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config).train()


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama, hidden 16, vocabulary VOCAB, attention_dropout 0.2 (unless overridden):
    `model.layers.N.` are its blocks; its only dropout is `attention_dropout` (transformers' default 0)."""
    settings = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=32, attention_dropout=0.2)
    return LlamaConfig(**{**settings, **overrides})


def tiny_llama(seed: int = 0, causal_lm: bool = False, **config) -> PreTrainedModel:
    """A tiny Llama in train mode: a sequence classifier (2 labels, pad_token_id 0) or a causal LM."""
    torch.manual_seed(seed)
    if causal_lm:
        return LlamaForCausalLM(tiny_llama_config(**config)).train()
    return LlamaForSequenceClassification(tiny_llama_config(num_labels=2, pad_token_id=0, **config)).train()


def padless_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer like a decoder LLM's: bos, eos and unk tokens, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(words)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def random_batch(seed: int, size: int = 8, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (size, length), generator=g),
            "labels": torch.randint(0, 2, (size,), generator=g)}


def split_chunks(batch: dict[str, torch.Tensor], chunks: int) -> list[dict[str, torch.Tensor]]:
    """Equal micro-batch chunks of a batch."""
    size = next(iter(batch.values())).shape[0]
    step = size // chunks
    return [{key: value[i * step:(i + 1) * step] for key, value in batch.items()} for i in range(chunks)]
