"""The exact global Bi-Drop threshold: the n-th largest of N scores spread over ranks, ties kept.

Scores are non-negative float32 (or +inf), so their IEEE-754 bit patterns read as int32 sort
exactly like the values; a pattern with the sign bit set (a negative score) is not a candidate.
A radix select finds the threshold's 31 bits from the top in four rounds, each one all-reduce of a
small histogram (at most 1024 int64 counts, 8 KiB) that fixes the next bits of the prefix:

1. One pass over the scores histograms the top FIRST bits of every candidate (15 on CPU, 9
   elsewhere) locally. Round 1 all-reduces its top 9 bits (512 bins, plus the non-finite flag);
   round 2 the remaining FIRST - 9 bits inside the chosen bin, read from the same local histogram.
2. A second pass gathers the bit patterns whose top FIRST bits equal the prefix (on real scores a
   few hundredths of a percent of them), unless there are too many (more than 1/COMPACT_DIVISOR of
   the elements, e.g. heavy ties), in which case the later rounds read the scores again.
3. The remaining bits take the remaining rounds, each a histogram of one bit field of the
   candidates (a clamp to the prefix's range sends everything else to two ignored end bins).

After the last round the prefix is the threshold's bit pattern, exactly. Nothing but these four
histograms crosses ranks; no score is gathered. On CPU the passes run over chunks of CHUNK
elements, so the temporaries stay in cache and are O(chunk); the gathered candidates (4 bytes each)
are at most 1/COMPACT_DIVISOR of the elements.

`group_thresholds` selects in G groups at once (one n-th largest per group: a per-tensor
threshold), with the same four all-reduces: each round sends the G groups' histograms side by
side (G x at most 1024 counts). With several groups the first pass histograms FLAG_BITS bits only
(G histograms of 2^15 counts would cost 256 KiB each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, Sequence

import torch

ROUNDS = 4
FLAG_BITS = 9          # round 1: the top 9 bits (512 int64 counts) and the non-finite flag
MAX_FIELD_BITS = 10    # any round: at most 1024 int64 counts (8 KiB) cross ranks
INT32_MAX = (1 << 31) - 1
# Per device type (others: the default). FIRST: bits histogrammed in the first pass (15 on CPU,
# the two first rounds; 9 elsewhere, where a histogram of > 1000 bins would use global atomics).
FIRST_BITS = {"cpu": 15}
DEFAULT_FIRST_BITS = FLAG_BITS
CHUNK = {"cpu": 1 << 18}   # elements per pass step; elsewhere 1 << 24
DEFAULT_CHUNK = 1 << 24
COMPACT_DIVISOR = 4        # gather the candidates if at most numel / 4 (<= 1 byte per element)


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


def _slices(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """The pieces cut into consecutive slices of at most one chunk each (views)."""
    if not pieces:
        return []
    step = CHUNK.get(pieces[0].device.type, DEFAULT_CHUNK)
    return [piece[start:start + step] for piece in pieces for start in range(0, piece.numel(), step)]


def _pick(counts: list[int], remaining: int) -> tuple[int, int, int]:
    """The bin holding the `remaining`-th largest (from the top bin down), its rank inside that
    bin, and how many counted elements lie in the bins above it."""
    above = 0
    for digit in range(len(counts) - 1, -1, -1):
        if counts[digit] >= remaining:
            return digit, remaining, above
        remaining -= counts[digit]
        above += counts[digit]
    raise AssertionError("select: histogram counts do not add up across ranks")


def _fields(bits: int, rounds: int) -> list[int]:
    """`bits` split into at most `rounds` fields of near-equal width, high first."""
    out = []
    for left in range(rounds, 0, -1):
        width = -(-bits // left)
        if width:
            out.append(width)
        bits -= width
    return out


def _plan(first: int) -> list[int]:
    """The bit widths of the four rounds when the first pass histograms `first` bits."""
    head = [FLAG_BITS] + ([first - FLAG_BITS] if first > FLAG_BITS else [])
    plan = head + _fields(31 - max(first, FLAG_BITS), ROUNDS - len(head))
    if first < FLAG_BITS or sum(plan) != 31 or max(plan) > MAX_FIELD_BITS:
        raise ValueError(f"select: first-pass width {first} gives rounds {plan} (need 31 bits, "
                         f"<= {MAX_FIELD_BITS} each)")
    return plan


def _first_pass(slices: list[torch.Tensor], first: int, local: torch.Tensor, buf: torch.Tensor) -> None:
    """local[1 + top `first` bits after the sign] += 1 per candidate; non-candidates go to local[0].
    `buf`: int32 scratch of at least the longest slice."""
    shift = 31 - first
    cpu = local.device.type == "cpu"
    for piece in slices:
        key = torch.clamp(piece, min=-(1 << shift), out=buf[:piece.numel()])  # negative -> -1 below
        key.bitwise_right_shift_(shift).add_(1)
        if cpu and int(key.max()) == 0:
            continue  # a run of non-candidates (an ineligible parameter): nothing to count
        local.add_(torch.bincount(key, minlength=local.numel()))


def _gather(slices: list[torch.Tensor], shift: int, prefix: int, device: torch.device) -> torch.Tensor:
    """The bit patterns whose top bits (bits >> shift) equal `prefix`, gathered into a new tensor.

    Per chunk: the hits as a byte mask, whose nonzero 8-byte words (scanned as int64) locate them."""
    size = (max((piece.numel() for piece in slices), default=0) + 7) // 8 * 8
    shifted = torch.empty(size, dtype=torch.int32, device=device)
    hit = torch.zeros(size, dtype=torch.uint8, device=device)
    lanes = torch.arange(8, device=device)
    found = []
    for piece in slices:
        length = piece.numel()
        torch.bitwise_right_shift(piece, shift, out=shifted[:length])
        torch.eq(shifted[:length], prefix, out=hit[:length])
        hit[length:] = 0
        words = hit.view(torch.int64).nonzero().view(-1)
        if words.numel():
            index = (words.unsqueeze(1) * 8 + lanes).view(-1)
            index = index[hit[index].bool()]
            found.append(piece.index_select(0, index))
    if not found:
        return torch.empty(0, dtype=torch.int32, device=device)
    return found[0] if len(found) == 1 else torch.cat(found)


def _field_histogram(slices: list[torch.Tensor], low: int, shift: int, width: int, device: torch.device
                     ) -> torch.Tensor:
    """Counts of the `width`-bit field above `shift` of the patterns in [low, low + 2^(shift+width)).

    A clamp to [low - 2^shift, high] and a shift map those patterns to 1..2^width and everything
    below (above) the range to 0 (2^width + 1): no mask, no index copy."""
    bins = 1 << width
    floor = low - (1 << shift)
    high = min(low + (bins << shift), INT32_MAX)  # INT32_MAX itself, if in range, lands in its own bin
    hist = torch.zeros(bins + 2, dtype=torch.int64, device=device)
    buf = torch.empty(max((piece.numel() for piece in slices), default=0), dtype=torch.int32, device=device)
    for piece in slices:
        field = torch.clamp(piece, floor, high, out=buf[:piece.numel()])
        field.sub_(floor).bitwise_right_shift_(shift)
        hist.add_(torch.bincount(field, minlength=bins + 2))
    return hist[1:bins + 1].clone()


def global_threshold(scores: torch.Tensor | Sequence[torch.Tensor], n: int, comm: Communicator,
                     locally_nonfinite: bool = False, device: torch.device | None = None) -> Threshold | None:
    """The n-th largest score over all ranks (each passes its own float32 `scores`: one tensor,
    or a list of pieces, views where they live, read in place).

    Scores are >= 0 (or +inf); a negative score marks an element that is not a candidate (an
    ineligible parameter or padding inside a partition): it is neither counted in N nor kept.

    Every rank must call this with the same n (and on the same device type). `locally_nonfinite`
    says this rank's statistics are poisoned: the flag rides in the first all-reduce, and if any
    rank raised it every rank returns None (skip the step) without looking at its scores further.
    n must be in 1..N. `scores` is only read. `device` is where the counts live (needed only if
    `scores` is an empty list).
    """
    pieces = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    found = group_thresholds([pieces], [n], comm, locally_nonfinite, device)
    return None if found is None else found[0]


def group_thresholds(groups: Sequence[Sequence[torch.Tensor]], ns: Sequence[int], comm: Communicator,
                     locally_nonfinite: bool = False, device: torch.device | None = None
                     ) -> list[Threshold] | None:
    """For each group of score pieces (this rank's part of one tensor, say), the ns[g]-th largest
    score of that group over all ranks: G exact thresholds from the same four all-reduces.

    Every rank passes the same number of groups in the same order (a group may be empty on a
    rank) and the same ns; otherwise as `global_threshold`, whose single group this generalises.
    """
    if not groups or len(groups) != len(ns):
        raise ValueError(f"select: {len(groups)} groups and {len(ns)} counts n (need as many, at least one)")
    pieces = [piece for group in groups for piece in group]
    if any(piece.dtype != torch.float32 for piece in pieces):
        raise TypeError(f"select: scores must be float32, got {sorted({str(p.dtype) for p in pieces})}")
    bits = [[piece.contiguous().view(-1).view(torch.int32) for piece in group] for group in groups]
    slices = [_slices(group) for group in bits]
    numels = [sum(piece.numel() for piece in group) for group in bits]
    device = pieces[0].device if pieces else (device or torch.device("cpu"))
    first = FIRST_BITS.get(device.type, DEFAULT_FIRST_BITS) if len(groups) == 1 else FLAG_BITS
    plan = _plan(first)
    local = torch.zeros(len(groups), (1 << first) + 1, dtype=torch.int64, device=device)
    if not locally_nonfinite:
        buf = torch.empty(max((s.numel() for group in slices for s in group), default=0), dtype=torch.int32,
                          device=device)
        for g, group in enumerate(slices):
            _first_pass(group, first, local[g], buf)
    candidates = local[:, 1:]
    top = candidates.reshape(len(groups), 1 << FLAG_BITS, -1).sum(2)
    flagged = torch.cat([top.reshape(-1), torch.tensor([int(locally_nonfinite)], dtype=torch.int64, device=device)])
    comm.all_reduce_sum(flagged)
    counts = flagged.tolist()
    if counts.pop() > 0:
        return None
    bins = 1 << FLAG_BITS
    for g, n in enumerate(ns):
        total = sum(counts[g * bins:(g + 1) * bins])
        if not 1 <= n <= total:
            where = "" if len(groups) == 1 else f" (group {g})"
            raise ValueError(f"select: n = {n} is outside 1..N = {total}{where}")
    # per group: the prefix found so far, the rank still sought inside it, the count above it
    state = [_pick(counts[g * bins:(g + 1) * bins], n) for g, n in enumerate(ns)]
    prefixes, remaining, above = [s[0] for s in state], [s[1] for s in state], [s[2] for s in state]
    known, rounds = FLAG_BITS, 1
    if first > FLAG_BITS:  # round 2 from the same local histograms: the sub-bins of each chosen bin
        width = first - FLAG_BITS
        sub = torch.cat([candidates[g, d << width:(d + 1) << width] for g, d in enumerate(prefixes)])
        comm.all_reduce_sum(sub)
        prefixes, remaining, above = _advance(sub.tolist(), 1 << width, width, prefixes, remaining, above)[:3]
        known, rounds = first, 2
    left = 31 - known  # bits still unknown; local[g, 1 + prefix] of this rank's elements share the prefix
    values = []
    for g, group in enumerate(slices):
        if int(local[g, 1 + prefixes[g]]) * COMPACT_DIVISOR <= numels[g]:
            values.append([_gather(group, left, prefixes[g], device)])
        else:  # too many to gather (heavy ties): the later rounds read all the scores again
            values.append(group)
    ties = [0] * len(groups)
    for width in plan[rounds:]:
        shift = left - width
        hist = torch.cat([_field_histogram(values[g], prefixes[g] << left, shift, width, device)
                          for g in range(len(groups))])
        comm.all_reduce_sum(hist)
        prefixes, remaining, above, ties = _advance(hist.tolist(), 1 << width, width, prefixes, remaining, above)
        left = shift
    # Each prefix is now the full bit pattern of its tau; `ties` are the elements equal to it.
    values_out = torch.tensor(prefixes, dtype=torch.int32).view(torch.float32).tolist()
    return [Threshold(value=value, kept=a + t) for value, a, t in zip(values_out, above, ties)]


def _advance(counts: list[int], bins: int, width: int, prefixes: list[int], remaining: list[int],
             above: list[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """One round for every group: pick the bin in the group's slice of `counts`, extend its prefix
    by `width` bits; also returns the chosen bins' counts."""
    out = ([], [], [], [])
    for g, (prefix, rank, count_above) in enumerate(zip(prefixes, remaining, above)):
        group_counts = counts[g * bins:(g + 1) * bins]
        digit, rank, more = _pick(group_counts, rank)
        for column, value in zip(out, ((prefix << width) | digit, rank, count_above + more, group_counts[digit])):
            column.append(value)
    return out
