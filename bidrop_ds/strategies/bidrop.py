"""Bi-Drop's rule: score each element from the k passes, keep the top p (ties kept) of all
eligible elements at once, or of each eligible tensor (`threshold="per_tensor"`)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from bidrop_ds.core import group_thresholds, kept_count, scores_into_m2
from bidrop_ds.core.ranges import layout_slices
from bidrop_ds.core.scores import mask_update_, masked_mean_into_, pair_scores_
from bidrop_ds.strategies.base import Outcome, RuleContext

logger = logging.getLogger(__name__)


class BiDropRule:
    """Scores, one exact global threshold (or one per eligible tensor, from the same collectives),
    the mean masked (and optionally / p).

    k = 2 with fp32 gradients (the default): the scores are computed into the second pass's own
    views and the masked mean is written there (4 bytes of statistics per eligible element).
    Otherwise (k > 2, 16-bit gradients) the Welford statistics hold the scores in M2 and the
    masked mean is copied into the gradient (8 bytes)."""

    def __init__(self, context: RuleContext) -> None:
        self.context = context
        self.n = kept_count(context.config.p, context.total_numel)
        # per_tensor: each eligible parameter's ranges in the layout, and its own n = ceil(p N_t)
        self.tensors = ([(piece.ranges, kept_count(context.config.p, piece.numel)) for piece in context.parameters]
                        if context.config.threshold == "per_tensor" else None)
        self.warned_identical = False
        self.scores: torch.Tensor | list[torch.Tensor] | None = None

    def prepare(self, step: int, grad_scale: float) -> bool:
        context, config, stats = self.context, self.context.config, self.context.stats
        pair = config.k == 2 and stats.last is not None and all(t.dtype == torch.float32 for t in stats.last)
        generator = context.generator(step) if config.score == "random" else None
        if pair:
            self.scores = pair_scores_(stats, context.weights(), config.score, config.eps, generator, grad_scale)
        else:
            stats.fold_last()
        self._warn_if_identical(step)
        if not pair:
            self.scores = scores_into_m2(stats, context.weights(), config.score, config.eps, generator, grad_scale)
        return pair

    def _warn_if_identical(self, step: int) -> None:
        if not self.warned_identical and self.context.stats.spread_is_zero():  # before the scores replace M2
            self.warned_identical = True
            logger.warning("Bi-Drop step %d: the k = %d passes gave identical gradients on every element this "
                           "rank holds, so dropout did not act and the mask ranks by gradient magnitude alone. "
                           "Check that the model's dropout is really on (a model may disable it internally "
                           "whatever its config says) and that no module is in eval mode (warned once)",
                           step, self.context.config.k)

    def decide(self, step: int, finite: bool, grad_scale: float) -> Outcome | None:
        """One exact threshold over all eligible elements, or one per eligible tensor (its pieces on
        this rank, possibly none), from the four all-reduces of one selection; each element is masked
        with its own threshold."""
        context, config, stats = self.context, self.context.config, self.context.stats
        scores, self.scores = self.scores, None
        pair = isinstance(scores, list)  # the pair path: the scores sit where the gradient lives
        pieces = scores if pair else [scores]
        if self.tensors is None:
            groups, counts = [pieces], [self.n]
        else:
            groups = [[view for start, end in ranges for view in layout_slices(pieces, start, end)]
                      for ranges, _ in self.tensors]
            counts = [n for _, n in self.tensors]
        found = group_thresholds(groups, counts, context.selection_comm, not finite, device=stats.device)
        finite = finite and found is not None
        if not context.sharded:
            finite, _ = context.agree(finite)  # the selection did not already carry the flag
        if not finite:
            return None
        divisor = config.p if config.rescale else 1.0
        means = stats.mean_pieces() if pair else [stats.mean]
        whole = [(0, sum(piece.numel() for piece in pieces))]
        spans = [whole] if self.tensors is None else [ranges for ranges, _ in self.tensors]
        for ranges, threshold in zip(spans, found):
            for start, end in ranges:
                if pair:
                    masked_mean_into_(layout_slices(pieces, start, end), layout_slices(means, start, end),
                                      threshold.value, divisor)
                else:  # update *= (scores >= tau); scores consumed
                    mask_update_(stats.mean[start:end], scores[start:end], threshold.value)
        if not pair and divisor != 1.0:
            stats.mean.div_(divisor)
        return Outcome(kept=sum(threshold.kept for threshold in found),
                       threshold=found[0].value if self.tensors is None else None)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: the mask is step-wise."""
