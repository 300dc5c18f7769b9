"""The part shared by backends whose statistics cover this rank's shard of every trainable element
(DeepSpeed ZeRO, FSDP2): fragments that say which parameter each element belongs to, segments
(views where each pass's gradient lives) and a flat layout over them that the core works on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

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


def ineligible_ranges(total: int, keep: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The complement of the `keep` ranges in [0, total), as few ranges as possible."""
    out, cursor = [], 0
    for start, end in sorted(keep):
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < total:
        out.append((cursor, total))
    return out


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
                 agreement_comm: Communicator, selects_locally: bool = False) -> None:
        self.partition = partition
        self.numel = partition.numel
        self.device = device
        self.agreement_comm = agreement_comm
        # A replica (every rank holds every element) selects locally; a shard selects over the group.
        self.selection_comm = LocalCommunicator() if selects_locally else agreement_comm
        eligible = torch.tensor([sum(f.numel for f in partition.fragments if f.eligible)], dtype=torch.int64,
                                device=device)
        self.selection_comm.all_reduce_sum(eligible)
        self.total_numel = int(eligible.item())
        if self.total_numel == 0:
            names = [f.name for f in partition.fragments][:3]
            raise ValueError(f"BiDrop: include={list(config.include)} / exclude={list(config.exclude)} select "
                             f"no trainable parameter (names look like {names}); adjust the patterns")
        self._ineligible = ineligible_ranges(self.numel, [(f.offset, f.offset + f.numel)
                                                          for f in partition.fragments if f.eligible])

    def pass_gradient(self) -> list[torch.Tensor]:
        return self.partition.segments()

    def end_pass(self) -> None:
        torch._foreach_zero_(self.partition.segments())

    def abs_params(self) -> torch.Tensor:
        return self.partition.master().abs_()

    def mark_ineligible(self, scores: torch.Tensor, value: float) -> None:
        """Give the elements of ineligible parameters (and padding) the score `value`."""
        for start, end in self._ineligible:
            scores[start:end] = value

    def others_finite(self) -> bool:
        return True  # every trainable element is in the statistics

    def write_gradients(self, update: torch.Tensor, passes: int) -> None:
        segments = [t.view(-1) for t in self.partition.segments()]
        torch._foreach_copy_(segments, list(update.split([t.numel() for t in segments])))
