"""What every mask rule shares: the narrow context it sees, the outcome of a step's decision, and
the one agreement collective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import torch

from bidrop_ds.config import BiDropConfig
from bidrop_ds.core import Communicator, PassStatistics

if TYPE_CHECKING:
    from bidrop_ds.backends.partition import ParameterSlice


@dataclass(frozen=True)
class RuleContext:
    """All a mask rule sees of a run: this rank's eligible elements as one flat layout, and the ranks.

    The driver (`BiDrop`) builds it from its backend; a test builds it on flat tensors with a
    `LocalCommunicator`. `selection_comm` joins the ranks that hold distinct elements (an exact
    selection's collectives; a `LocalCommunicator` where every rank holds every element),
    `agreement_comm` every rank of the step; they are the same object where the ranks' elements
    are distinct (a shard)."""

    config: BiDropConfig
    stats: PassStatistics                           # the step's passes over this rank's elements
    weights: Callable[[], Sequence[torch.Tensor]]   # theta over the same elements, pieces in that order
    parameters: Sequence[ParameterSlice]            # each eligible parameter's ranges in the layout
    total_numel: int                                # eligible elements over all ranks
    selection_comm: Communicator
    agreement_comm: Communicator
    generator: Callable[[int], torch.Generator]     # step -> the seeded generator of its random draws

    @property
    def sharded(self) -> bool:
        """Whether the ranks hold distinct elements (else each holds every one, as a replica)."""
        return self.selection_comm is self.agreement_comm

    def agree(self, finite: bool, kept_local: int = 0) -> tuple[bool, int]:
        """One all-reduce: whether every rank is finite, and `kept_local` summed over the ranks that
        own distinct elements (a replica, holding every element, keeps its own count)."""
        sharded = self.sharded
        flags = torch.tensor([0 if finite else 1, kept_local if sharded else 0], dtype=torch.int64,
                             device=self.stats.device)
        self.agreement_comm.all_reduce_sum(flags)
        return int(flags[0]) == 0, int(flags[1]) if sharded else kept_local


@dataclass(frozen=True)
class Outcome:
    """A step's decision: eligible elements updated (over all ranks) and the threshold, if one."""

    kept: int
    threshold: float | None = None


class MaskRule(Protocol):
    """Turns the passes (`context.stats`) into the update.

    `prepare` finishes the statistics (it may read the held last pass where it lives) and says
    whether the update will be written in place there (else it is `context.stats.mean`, which
    the driver copies into the gradient). `decide` runs on every rank with the same `step`, after
    the finiteness check; it must agree with the other ranks on whether the step is finite
    (returning None on every rank if not) and touches the gradient only where `prepare` said so."""

    def prepare(self, step: int, grad_scale: float) -> bool: ...

    def decide(self, step: int, finite: bool, grad_scale: float) -> Outcome | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class FoldsPasses:
    """A rule that works on the mean: the held last pass is folded in (Welford) at `prepare`."""

    context: RuleContext

    def prepare(self, step: int, grad_scale: float) -> bool:
        self.context.stats.fold_last()
        return False


class Unmasked:
    """Vanilla fine-tuning (and Bi-Drop with k = 1 or p = 1): the update is the mean gradient;
    with one pass it is the gradient itself, left in place (no statistics at all)."""

    def __init__(self, context: RuleContext) -> None:
        self.context = context

    def prepare(self, step: int, grad_scale: float) -> bool:
        if self.context.stats.count == 1:
            return True
        self.context.stats.fold_last()
        return False

    def decide(self, step: int, finite: bool, grad_scale: float) -> Outcome | None:
        finite, _ = self.context.agree(finite)
        return Outcome(kept=self.context.total_numel) if finite else None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""
