"""DPS (Zhang et al. 2022), cycle-wise, on the Bi-Drop machinery (../shared/BIDROP.md).

Steps run in phases of U = `dps_window` steps. In a full phase every element is updated and each
step's squared (unscaled) gradient is summed; the next phase updates only the top p of each
eligible parameter by that sum (a per-parameter exact selection, every rank taking part for every
parameter in the same order), then the cycle repeats. One fp32 buffer per owned element holds the
sum during a full phase and the 0/1 mask during a masked one.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from bidrop_ds.core import accumulate_squares_, global_threshold, kept_count
from bidrop_ds.strategies.base import FoldsPasses, Outcome, RuleContext


class Dps(FoldsPasses):
    """Full phases gather the Fisher sum; masked phases keep each parameter's top p of it."""

    def __init__(self, context: RuleContext) -> None:
        self.context = context
        self.window = context.config.dps_window
        self.buffer = torch.zeros(context.stats.numel, dtype=torch.float32, device=context.stats.device)
        self.mask_phase = -1  # the masked phase the buffer's mask belongs to
        self.kept = 0

    def decide(self, step: int, finite: bool, grad_scale: float) -> Outcome | None:
        phase, position = divmod(step, self.window)
        masked = phase % 2 == 1
        if masked and self.mask_phase != phase:  # every rank reaches this at the same step
            self._fix_mask(phase)
        elif not masked and position == 0:
            self.buffer.zero_()
        finite, _ = self.context.agree(finite)
        if not finite:
            return None
        update = self.context.stats.mean
        if not masked:
            accumulate_squares_(self.buffer, update, grad_scale)
            return Outcome(kept=self.context.total_numel)
        update.mul_(self.buffer)
        return Outcome(kept=self.kept)

    def _fix_mask(self, phase: int) -> None:
        """The buffer's Fisher sum becomes 1 on each parameter's top p (ties kept), else 0."""
        comm, p = self.context.selection_comm, self.context.config.p
        empty = self.buffer[:0]
        kept = 0
        for piece in self.context.parameters:
            local = [self.buffer[start:end] for start, end in piece.ranges]
            scores = local[0] if len(local) == 1 else torch.cat(local) if local else empty
            found = global_threshold(scores, kept_count(p, piece.numel), comm)
            for view in local:
                view.ge_(found.value)
            kept += found.kept
        self.mask_phase, self.kept = phase, kept

    def state_dict(self) -> dict[str, Any]:
        """The buffer is this rank's shard; a resumed run restarts the current cycle's statistics."""
        return {"window": self.window}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore (see state_dict)."""
