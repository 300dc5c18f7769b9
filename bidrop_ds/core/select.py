"""The exact global Bi-Drop threshold: the n-th largest of N scores spread over ranks, ties kept.

Scores are non-negative float32 (or +inf), so their IEEE-754 bit patterns read as integers sort
exactly like the values. A radix select walks those 32 bits from the top, one byte per round:
each rank histograms that byte of its candidates (scores whose higher bytes equal the prefix found
so far), one all-reduce of the 256-bin histogram picks the byte value holding the n-th largest,
and after four rounds the prefix is the threshold's bit pattern, exactly. Nothing but four
histograms of 2 KiB crosses ranks; no score is gathered. The bytes are read through a uint8 view
of the scores (no shifted copies); a round's temporaries are at most 2 bytes per element.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

import torch

NUM_BINS = 256
# Columns of a float32's 4 bytes from the most significant down, in memory order.
BYTES_HIGH_TO_LOW = (3, 2, 1, 0) if sys.byteorder == "little" else (0, 1, 2, 3)


class Communicator(Protocol):
    """What the selection needs from the data-parallel group: an in-place sum over ranks."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> None: ...


class LocalCommunicator:
    """One rank holds every score (single process, or DDP where all ranks hold the same scores)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        return None


def kept_count(p: float, total: int) -> int:
    """n = max(1, ceil(p * N)), with p read as the decimal the user wrote (0.1 * 10 is 1, not 2)."""
    if total <= 0:
        return 0
    return max(1, math.ceil(Decimal(repr(float(p))) * total))


@dataclass(frozen=True)
class Threshold:
    """The global threshold tau and how many elements (all ranks) have score >= tau."""

    value: float
    kept: int


def _score_bytes(scores: torch.Tensor) -> torch.Tensor:
    """The scores' bytes as an (N, 4) uint8 view."""
    if scores.dtype != torch.float32:
        raise TypeError(f"select: scores must be float32, got {scores.dtype}")
    return scores.contiguous().view(torch.uint8).view(-1, 4)


def global_threshold(scores: torch.Tensor, n: int, comm: Communicator,
                     locally_nonfinite: bool = False) -> Threshold | None:
    """The n-th largest score over all ranks (each passes its own flat float32 `scores`).

    Scores are >= 0 (or +inf); a negative score marks an element that is not a candidate (an
    ineligible parameter or padding inside a partition): it is neither counted in N nor kept.

    Every rank must call this with the same n. `locally_nonfinite` says this rank's statistics are
    poisoned: the flag rides in the first all-reduce, and if any rank raised it every rank returns
    None (skip the step) without looking at its scores further. n must be in 1..N.
    """
    columns = _score_bytes(scores)
    alive = None  # where the higher bytes equal the prefix (None: everywhere, in the first round)
    prefix = 0
    above = 0  # elements known to be strictly above the current prefix's range (global)
    remaining = n  # rank of the threshold among the candidates, 1 = largest
    for round_index, column in enumerate(BYTES_HIGH_TO_LOW):
        digits = columns[:, column]
        if round_index == 0 and locally_nonfinite:
            hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=scores.device)
        else:
            hist = torch.bincount(digits if alive is None else digits[alive], minlength=NUM_BINS)
        if round_index == 0:
            flagged = torch.cat([hist, torch.tensor([int(locally_nonfinite)], device=hist.device)])
            comm.all_reduce_sum(flagged)
            if int(flagged[-1]) > 0:
                return None
            hist = flagged[:-1]
        else:
            comm.all_reduce_sum(hist)
        counts = hist.tolist()
        if round_index == 0:
            counts[NUM_BINS // 2:] = [0] * (NUM_BINS // 2)  # sign bit set: not a candidate
            if not 1 <= n <= sum(counts):
                raise ValueError(f"select: n = {n} is outside 1..N = {sum(counts)}")
        for digit in range(NUM_BINS - 1, -1, -1):
            if counts[digit] >= remaining:
                break
            remaining -= counts[digit]
            above += counts[digit]
        prefix = (prefix << 8) | digit
        if round_index < len(BYTES_HIGH_TO_LOW) - 1:
            same = digits == digit
            alive = same if alive is None else alive.logical_and_(same)
    # The prefix is now the full bit pattern of tau; counts[digit] are the elements equal to it.
    value = torch.tensor([prefix - (1 << 32) if prefix >= 1 << 31 else prefix], dtype=torch.int32)
    return Threshold(value=value.view(torch.float32).item(), kept=above + counts[digit])
