"""Bi-Drop inside TRL: `BiDropSFTTrainer` (TRL's `SFTTrainer` with `BiDropTrainerMixin`), and the same
mixin for any other TRL trainer whose step is the Trainer's (e.g. `RewardTrainer`).

    trainer = BiDropSFTTrainer(model, args=SFTConfig(...), train_dataset=rows, peft_config=...,
                               bidrop_config=BiDropConfig(k=2, p=0.3))

Everything TRL does (dataset formats, chat templates, completion-only and assistant-only loss, packing,
padding-free batches, peft, the fused LM head) happens as in `SFTTrainer`: Bi-Drop only changes the
step (`bidrop_ds.integrations.hf_trainer`). TRL records its training metrics (`num_tokens`,
`mean_token_accuracy`, `entropy`, a MoE `aux_loss`) inside `compute_loss`, which a Bi-Drop step calls
k times per micro-batch; `TrlMetricsOncePerStep` keeps only the first pass's record, so the logged
metrics mean what they mean in a vanilla run (with k = 1 nothing changes at all).

TRL is optional: `import bidrop_ds` and `bidrop_ds.integrations` work without it; this module imports it.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn
from trl import RewardTrainer, SFTTrainer

from bidrop_ds.integrations.hf_trainer import BiDropTrainerMixin


class TrlMetricsOncePerStep(BiDropTrainerMixin):
    """A `BiDropTrainerMixin` for TRL trainers that record metrics in `compute_loss` (`self._metrics`, and the
    SFT token counter `self._total_train_tokens`): the passes after the first of a step run `compute_loss`
    with that record restored afterwards, so each micro-batch is counted once, as in a vanilla step."""

    _METRIC_STATE = ("_metrics", "_total_train_tokens")

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        self._bidrop_losses_computed = 0  # the step's passes (if this micro-batch ends the window) start here
        # the TRL trainer's own training_step, which the mixin's replaces, runs under activation offloading
        with getattr(self, "maybe_activation_offload_context", contextlib.nullcontext()):
            return super().training_step(model, inputs, num_items_in_batch)

    def _bidrop_chunk_loss(self, model: nn.Module, chunk: dict[str, Any], num_items_in_batch: Any,
                           chunks: int) -> torch.Tensor:
        # the k passes call this k x chunks times, pass by pass (hooks and DeepSpeed paths alike)
        first_pass = self._bidrop_losses_computed < chunks
        self._bidrop_losses_computed += 1
        if first_pass:
            return super()._bidrop_chunk_loss(model, chunk, num_items_in_batch, chunks)
        saved = {name: copy.deepcopy(getattr(self, name)) for name in self._METRIC_STATE if hasattr(self, name)}
        try:
            return super()._bidrop_chunk_loss(model, chunk, num_items_in_batch, chunks)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)


class BiDropSFTTrainer(TrlMetricsOncePerStep, SFTTrainer):
    """TRL's `SFTTrainer` with Bi-Drop: the same arguments, plus `bidrop_config=BiDropConfig(...)` (keyword)."""


class BiDropRewardTrainer(TrlMetricsOncePerStep, RewardTrainer):
    """TRL's `RewardTrainer` (a sequence classifier scoring chosen against rejected) with Bi-Drop."""
