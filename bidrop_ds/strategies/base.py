"""What every mask rule shares: the outcome of a step's decision and the one agreement collective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import torch

if TYPE_CHECKING:
    from bidrop_ds.bidrop import BiDrop


@dataclass(frozen=True)
class Outcome:
    """A step's decision: eligible elements updated (over all ranks) and the threshold, if one."""

    kept: int
    threshold: float | None = None


class MaskRule(Protocol):
    """Turns the passes (`bidrop.stats`) into the update.

    `prepare` finishes the statistics (it may read the held last pass where it lives) and says
    whether the update will be written in place there (else it is `bidrop.stats.mean`, which
    BiDrop copies into the gradient). `decide` runs on every rank with the same `step`, after
    the finiteness check; it must agree with the other ranks on whether the step is finite
    (returning None on every rank if not) and touches the gradient only where `prepare` said so."""

    def prepare(self, step: int, grad_scale: float) -> bool: ...

    def decide(self, step: int, finite: bool, grad_scale: float) -> Outcome | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def agree(bidrop: "BiDrop", finite: bool, kept_local: int = 0) -> tuple[bool, int]:
    """One all-reduce: whether every rank is finite, and `kept_local` summed over the ranks that
    own distinct elements (a replica, holding every element, keeps its own count)."""
    backend = bidrop.backend
    sharded = backend.selection_comm is backend.agreement_comm
    flags = torch.tensor([0 if finite else 1, kept_local if sharded else 0], dtype=torch.int64,
                         device=backend.device)
    backend.agreement_comm.all_reduce_sum(flags)
    return int(flags[0]) == 0, int(flags[1]) if sharded else kept_local


class FoldsPasses:
    """A rule that works on the mean: the held last pass is folded in (Welford) at `prepare`."""

    bidrop: "BiDrop"

    def prepare(self, step: int, grad_scale: float) -> bool:
        self.bidrop.stats.fold_last()
        return False


class Unmasked:
    """Vanilla fine-tuning (and Bi-Drop with k = 1 or p = 1): the update is the mean gradient;
    with one pass it is the gradient itself, left in place (no statistics at all)."""

    def __init__(self, bidrop: "BiDrop") -> None:
        self.bidrop = bidrop

    def prepare(self, step: int, grad_scale: float) -> bool:
        if self.bidrop.stats.count == 1:
            return True
        self.bidrop.stats.fold_last()
        return False

    def decide(self, step: int, finite: bool, grad_scale: float) -> Outcome | None:
        finite, _ = agree(self.bidrop, finite)
        return Outcome(kept=self.bidrop.backend.total_numel) if finite else None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""
