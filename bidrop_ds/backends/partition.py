"""The part shared by backends whose statistics cover this rank's shard of every trainable element
(DeepSpeed ZeRO, FSDP2): fragments that say which parameter each element belongs to, segments
(views where each pass's gradient lives) and a flat layout over them that the core works on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from bidrop_ds.config import BiDropConfig
from bidrop_ds.core import Communicator, LocalCommunicator
from bidrop_ds.core.ranges import complement


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


def module_parameters(module: nn.Module) -> list[tuple[str, int]]:
    """(name, full element count) of every trainable parameter, in the order all ranks share
    (a ZeRO-3 partitioned parameter reports its full size in `ds_numel`)."""
    return [(name, int(getattr(param, "ds_numel", param.numel())))
            for name, param in module.named_parameters() if param.requires_grad]


class Partition(Protocol):
    """This rank's elements: `fragments` place parameters in a flat layout of `numel` elements,
    `segments()` are the tensors holding the current pass's gradient in that layout's order, and
    `master()` the (fp32 master) weights in the same layout."""

    fragments: list[Fragment]
    numel: int

    def segments(self) -> list[torch.Tensor]: ...

    def master(self) -> torch.Tensor: ...


class ShardedBackend:
    """The statistics cover every trainable element this rank holds; elements of ineligible
    parameters (and padding) get a negative score, which the selection skips and the mask keeps."""

    def __init__(self, partition: Partition, config: BiDropConfig, device: torch.device,
                 agreement_comm: Communicator, parameters: list[tuple[str, int]],
                 selects_locally: bool = False) -> None:
        self.partition = partition
        self._parameters = [(name, numel) for name, numel in parameters if config.is_eligible(name)]
        self.numel = partition.numel
        self.device = device
        self.agreement_comm = agreement_comm
        # A replica (every rank holds every element) selects locally; a shard selects over the group.
        self.selection_comm = LocalCommunicator() if selects_locally else agreement_comm
        # Eligible elements held here; no collective in construction: BiDrop's one all-reduce, after
        # every rank built its part, sets `total_numel` (over the ranks, or held_numel on a replica).
        self.held_numel = sum(f.numel for f in partition.fragments if f.eligible)
        # elements of ineligible parameters and padding: not scored, never candidates, always kept
        self.ineligible_ranges = complement(self.numel, [(f.offset, f.offset + f.numel)
                                                        for f in partition.fragments if f.eligible])

    def parameter_slices(self) -> list[ParameterSlice]:
        """Every eligible parameter (same list on every rank) with the ranges this rank holds."""
        held: dict[str, list[tuple[int, int]]] = {}
        for f in self.partition.fragments:
            if f.eligible and f.numel:
                held.setdefault(f.name, []).append((f.offset, f.offset + f.numel))
        return [ParameterSlice(name, numel, tuple(held.get(name, ()))) for name, numel in self._parameters]

    def pass_gradient(self) -> list[torch.Tensor]:
        return self.partition.segments()

    def end_pass(self) -> None:
        torch._foreach_zero_(self.partition.segments())

    def abs_params(self) -> torch.Tensor:
        """The (fp32 master) weights in the partition's layout; the scores take their absolute value."""
        return self.partition.master()

    def mark_ineligible(self, scores: torch.Tensor, value: float) -> None:
        """Give the elements of ineligible parameters (and padding) the score `value`."""
        for start, end in self.ineligible_ranges:
            scores[start:end] = value

    def others_finite(self) -> bool:
        return True  # every trainable element is in the statistics

    def discard_gradients(self) -> None:
        """Zero this pass's gradient without any optimizer step (Fisher estimation batches)."""
        torch._foreach_zero_(self.partition.segments())

    def write_gradients(self, update: torch.Tensor, passes: int) -> None:
        segments = [t.view(-1) for t in self.partition.segments()]
        torch._foreach_copy_(segments, list(update.split([t.numel() for t in segments])))
