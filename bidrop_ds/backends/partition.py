"""The part shared by backends whose gradients are sharded (DeepSpeed ZeRO, FSDP2): fragments that
say which parameter each element of this rank's partition belongs to, views where each pass's
gradient lives (one per fragment), and the statistics' layout over the eligible ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from bidrop_ds.config import BiDropConfig
from bidrop_ds.core import Communicator, LocalCommunicator


@dataclass(frozen=True)
class Fragment:
    """The piece of one parameter held in this rank's flat gradient partition."""

    name: str
    start: int      # first element held, in the flattened parameter
    offset: int     # where it sits in the flat partition
    numel: int      # valid elements (partition padding excluded)
    eligible: bool


@dataclass(frozen=True)
class ParameterSlice:
    """Where this rank holds the elements of one eligible parameter, in its flat layout (strategies
    that rank elements per parameter, like DPS, select over these on every rank in the same order)."""

    name: str
    numel: int                          # elements of the whole parameter, over all ranks
    ranges: tuple[tuple[int, int], ...]  # [start, end) in this rank's flat layout; empty if none


def zero_all(tensors: list[torch.Tensor]) -> None:
    """Zero every non-empty tensor in one foreach call (none at all is fine: a rank may own no
    eligible element, e.g. a partition of embeddings only)."""
    tensors = [t for t in tensors if t.numel()]
    if tensors:
        torch._foreach_zero_(tensors)


def module_parameters(module: nn.Module) -> list[tuple[str, int]]:
    """(name, full element count) of every trainable parameter, in the order all ranks share
    (a ZeRO-3 partitioned parameter reports its full size in `ds_numel`)."""
    return [(name, int(getattr(param, "ds_numel", param.numel())))
            for name, param in module.named_parameters() if param.requires_grad]


class Partition(Protocol):
    """This rank's elements: `fragments` place parameters in the rank's flat partition, `views()`
    are the tensors holding the current pass's gradient (one 1-D view per fragment, in fragment
    order) and `master_views()` the (fp32 master) weights, likewise. `accumulates`: a pass's
    gradient left in place is added to by the next pass's (so ineligible elements sum themselves).
    `retains` (optional, default False): `release()` hands this pass's storage over, so that its
    views stay valid while the next pass lands in fresh storage."""

    fragments: list[Fragment]
    accumulates: bool

    def views(self) -> list[torch.Tensor]: ...

    def master_views(self) -> list[torch.Tensor]: ...

    def written(self) -> None:
        """The step's final gradient is in `views()` (for bookkeeping the engine did at the boundary)."""


class ShardedBackend:
    """The statistics cover the eligible elements this rank holds, laid out as its eligible
    fragments one after another. Ineligible elements cost no statistics: where the partition
    accumulates, their gradient is left in place through the passes (it sums itself) and divided
    by k at the end, which is exactly their mean; where it does not, they are summed in an fp32
    buffer of their own (4 bytes per ineligible element). Where the partition `retains` a pass
    (`retain_pass`), pass 1 stays where it lives for the step: then no buffer at all."""

    def __init__(self, partition: Partition, config: BiDropConfig, device: torch.device,
                 agreement_comm: Communicator, parameters: list[tuple[str, int]],
                 selects_locally: bool = False) -> None:
        self.partition = partition
        self._parameters = [(name, numel) for name, numel in parameters if config.is_eligible(name)]
        self.device = device
        self.agreement_comm = agreement_comm
        # A replica (every rank holds every element) selects locally; a shard selects over the group.
        self.selection_comm = LocalCommunicator() if selects_locally else agreement_comm
        fragments = partition.fragments
        self._eligible = [i for i, f in enumerate(fragments) if f.eligible and f.numel]
        self._others = [i for i, f in enumerate(fragments) if not f.eligible and f.numel]
        self.eligible_fragments = [fragments[i] for i in self._eligible]  # in the statistics' order
        self._stats_offsets, offset = {}, 0
        for i in self._eligible:
            self._stats_offsets[i] = offset
            offset += fragments[i].numel
        # The statistics' layout; no collective in construction: BiDrop's one all-reduce, after
        # every rank built its part, sets `total_numel` (over the ranks, or held_numel on a replica).
        self.numel = self.held_numel = offset
        others = sum(fragments[i].numel for i in self._others)
        self.retains = bool(getattr(partition, "retains", False))
        self._others_sum = (torch.zeros(others, dtype=torch.float32, device=device)
                            if others and not partition.accumulates and not self.retains else None)
        self._held_others: list[torch.Tensor] = []  # pass 1's ineligible views, where retained

    @property
    def own_bytes(self) -> int:
        """Bytes of this backend's own buffer (the ineligible sum, where the partition does not accumulate)."""
        return self._others_sum.nbytes if self._others_sum is not None else 0

    def parameter_slices(self) -> list[ParameterSlice]:
        """Every eligible parameter (same list on every rank) with its ranges in the statistics."""
        held: dict[str, list[tuple[int, int]]] = {}
        for i in self._eligible:
            f, start = self.partition.fragments[i], self._stats_offsets[i]
            held.setdefault(f.name, []).append((start, start + f.numel))
        return [ParameterSlice(name, numel, tuple(held.get(name, ()))) for name, numel in self._parameters]

    def _split(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        views = self.partition.views()
        return [views[i] for i in self._eligible], [views[i] for i in self._others]

    def pass_gradient(self) -> list[torch.Tensor]:
        """This pass's gradient of the eligible elements: views where it lives."""
        return self._split()[0]

    def begin_step(self) -> None:
        self._held_others = []
        if self._others_sum is not None:
            self._others_sum.zero_()

    def retain_pass(self) -> list[torch.Tensor]:
        """Keep this pass's gradient where it lives, its storage handed over by the engine (the
        next pass lands in fresh storage): returns the eligible views, for `PassStatistics.hold_first`;
        the ineligible ones are added to the last pass's in `finish_others`."""
        eligible, self._held_others = self._split()
        self.partition.release()
        return eligible

    def drop_retained(self) -> None:
        """Forget a retained pass (its storage is freed once the statistics drop theirs too)."""
        self._held_others = []

    def end_pass(self) -> None:
        """After a pass is folded: zero its eligible gradient; the ineligible one stays (or is
        added to this backend's sum where the partition does not accumulate)."""
        eligible, others = self._split()
        zero_all(eligible)
        if self._others_sum is not None:
            for total, grad in zip(self._others_sum.split([t.numel() for t in others]), others):
                total.add_(grad)

    def abs_params(self) -> list[torch.Tensor]:
        """The (fp32 master) weights of the eligible elements, views in the statistics' order."""
        masters = self.partition.master_views()
        return [masters[i] for i in self._eligible]

    def master_snapshot(self) -> torch.Tensor:
        """A copy of this rank's (fp32 master) weights, every fragment held one after another: for
        checks and tests (soak faults, the oracle), never on the step path."""
        views = [view for view in self.partition.master_views() if view.numel()]
        return torch.cat([view.reshape(-1).float() for view in views]) if views else torch.zeros(0)

    def others_finite(self) -> bool:
        """Whether the ineligible gradients summed so far are finite (one max-abs per fragment)."""
        pieces = [t for t in (*self._split()[1], *self._held_others) if t.numel()]
        if self._others_sum is not None:
            pieces.append(self._others_sum)
        return not pieces or bool(torch.isfinite(torch.stack(torch._foreach_norm(pieces, float("inf")))).all())

    def discard_gradients(self) -> None:
        """Zero this pass's gradient without any optimizer step (Fisher estimation batches)."""
        zero_all(self.partition.views())
        self.drop_retained()

    def write_update(self, update: torch.Tensor) -> None:
        """The eligible gradient := `update` (flat, in the statistics' layout)."""
        eligible = self._split()[0]
        if eligible:
            torch._foreach_copy_(eligible, list(update.split([t.numel() for t in eligible])))

    def finish_others(self, passes: int) -> None:
        """The ineligible gradient := the mean of its passes (their sum, in place, divided by k).
        Called last, once the whole gradient is written."""
        others = self._split()[1]
        if self._others_sum is not None:
            for grad, total in zip(others, self._others_sum.split([t.numel() for t in others])):
                grad.add_(total)
        held = [(grad, first) for grad, first in zip(others, self._held_others) if grad.numel()]
        if held:
            torch._foreach_add_([grad for grad, _ in held], [first for _, first in held])
        self.drop_retained()
        if others and passes > 1:
            torch._foreach_div_(others, float(passes))
        self.partition.written()
