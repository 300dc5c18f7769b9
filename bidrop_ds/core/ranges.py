"""Index ranges over a flat layout (one tensor, or pieces laid one after another)."""

from __future__ import annotations

from typing import Sequence

import torch


def complement(total: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """[0, total) minus the (start, end) ranges, as few ranges as possible (overlaps allowed)."""
    out, cursor = [], 0
    for start, end in sorted(ranges):
        if not 0 <= start <= end <= total:
            raise ValueError(f"range ({start}, {end}) is outside 0..{total}")
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < total:
        out.append((cursor, total))
    return out


def layout_slices(pieces: Sequence[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
    """The views of [start, end) of the layout that the 1-D `pieces` form one after another."""
    out, base = [], 0
    for piece in pieces:
        lo, hi = max(start, base), min(end, base + piece.numel())
        if lo < hi:
            out.append(piece[lo - base:hi - base])
        base += piece.numel()
    return out
