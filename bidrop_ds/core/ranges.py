"""Index ranges over a flat layout: the one helper the scores and the backends share."""

from __future__ import annotations

from typing import Sequence


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
