"""Bi-Drop's rule: score each element from the k passes, keep the global top p (ties kept)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import torch

from bidrop_ds.core import global_threshold, kept_count, scores_into_m2
from bidrop_ds.core.scores import mask_update_
from bidrop_ds.strategies.base import Outcome, agree

if TYPE_CHECKING:
    from bidrop_ds.bidrop import BiDrop

logger = logging.getLogger(__name__)


class BiDropRule:
    """Scores in place of M2, one exact global threshold, the mean masked (and optionally / p)."""

    def __init__(self, bidrop: "BiDrop") -> None:
        self.bidrop = bidrop
        self.n = kept_count(bidrop.config.p, bidrop.backend.total_numel)
        self.warned_identical = False

    def decide(self, step: int, finite: bool, grad_scale: float) -> Outcome | None:
        bidrop, config, backend = self.bidrop, self.bidrop.config, self.bidrop.backend
        if not self.warned_identical and bidrop.stats.spread_is_zero():  # before the scores replace M2
            self.warned_identical = True
            logger.warning("Bi-Drop step %d: the k = %d passes gave identical gradients on every element this "
                           "rank holds, so dropout did not act and the mask ranks by gradient magnitude alone. "
                           "Check that the model's dropout is really on (a model may disable it internally "
                           "whatever its config says) and that no module is in eval mode (warned once)",
                           step, config.k)
        generator = bidrop.mask_generator(step) if config.score == "random" else None
        scores = scores_into_m2(bidrop.stats, backend.abs_params(), config.score, config.eps, generator, grad_scale,
                                ineligible=backend.ineligible_ranges)  # -1 there: not a candidate, not scored
        found = global_threshold(scores, self.n, backend.selection_comm, not finite)
        finite = finite and found is not None
        if backend.selection_comm is not backend.agreement_comm:
            finite, _ = agree(bidrop, finite)  # the selection did not already carry the flag
        if not finite:
            return None
        update = bidrop.stats.mean
        if config.rescale:  # the kept eligible elements only (ineligible ones score -1)
            torch.where(scores >= found.value, update / config.p, update, out=update)
        backend.mark_ineligible(scores, float("inf"))  # ineligible: always kept
        mask_update_(update, scores, found.value)  # update *= (scores >= tau); the scores are consumed
        return Outcome(kept=found.kept, threshold=found.value)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: the mask is step-wise."""
