"""ChildTuning (Xu et al. 2021) on the Bi-Drop machinery, one pass per batch (../shared/BIDROP.md).

- ChildTuning-F: each step a fresh Bernoulli(p) mask over the eligible elements; kept gradients
  are divided by p.
- ChildTuning-D: the Fisher information (summed squared gradient) over the training batches given
  to `BiDrop.estimate_fisher`, once before training; the global top p of it, by one exact
  distributed selection over the ranks' shards, is the fixed mask (1 byte per owned element).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from bidrop_ds.core import accumulate_squares_, bernoulli_multiplier_, global_threshold, kept_count
from bidrop_ds.strategies.base import FoldsPasses, Outcome, RuleContext


class ChildTuningF(FoldsPasses):
    """A Bernoulli(p) keep mask per step (seeded like the passes), kept gradients scaled by 1/p."""

    def __init__(self, context: RuleContext) -> None:
        self.context = context

    def decide(self, step: int, finite: bool, grad_scale: float) -> Outcome | None:
        context = self.context
        multiplier = bernoulli_multiplier_(context.stats.m2, context.config.p, context.generator(step))
        kept_local = int(torch.count_nonzero(multiplier))
        finite, kept = context.agree(finite, kept_local)
        if not finite:
            return None
        context.stats.mean.mul_(multiplier)
        return Outcome(kept=kept)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: each step's mask comes from (seed, step)."""


class ChildTuningD(FoldsPasses):
    """A fixed mask: the eligible elements of the top-p Fisher information, ties kept."""

    def __init__(self, context: RuleContext) -> None:
        self.context = context
        self.fisher: torch.Tensor | None = None  # only while estimating
        self.dropped: torch.Tensor | None = None  # bool, True where the gradient is zeroed
        self.kept = 0
        self.threshold: float | None = None
        self.batches = 0

    def accumulate(self, grad: torch.Tensor, grad_scale: float) -> None:
        """Add one estimation batch's reduced gradient (a finite one) to the Fisher sum."""
        if self.fisher is None:
            self.fisher = torch.zeros_like(grad)
        accumulate_squares_(self.fisher, grad, grad_scale)
        self.batches += 1

    def finish(self) -> None:
        """Fix the mask from the Fisher sum (one distributed selection) and free the sum."""
        if self.fisher is None:
            raise ValueError("ChildTuning-D: no finite batch was given to estimate_fisher")
        context = self.context
        found = global_threshold(self.fisher, kept_count(context.config.p, context.total_numel),
                                 context.selection_comm, device=context.stats.device)
        self.dropped = self.fisher < found.value
        self.kept, self.threshold = found.kept, found.value
        self.fisher = None

    def decide(self, step: int, finite: bool, grad_scale: float) -> Outcome | None:
        if self.dropped is None:
            raise RuntimeError("strategy 'childtuning-d' needs its Fisher mask before the first step: call "
                               "bidrop.estimate_fisher(batches) on (a pass over) the training data first")
        finite, _ = self.context.agree(finite)
        if not finite:
            return None
        self.context.stats.mean.masked_fill_(self.dropped, 0.0)
        return Outcome(kept=self.kept, threshold=self.threshold)

    def state_dict(self) -> dict[str, Any]:
        """The mask itself is this rank's shard: re-estimate it on resume (same data, same mask)."""
        return {"fisher_batches": self.batches, "threshold": self.threshold}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore here; call estimate_fisher again after loading."""
