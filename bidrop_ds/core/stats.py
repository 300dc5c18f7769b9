"""Streaming per-element statistics of the k per-pass gradients (Welford's mean / M2).

Each pass's gradient is folded in as it arrives, so no pass is ever stored whole: the state is
fp32 buffers over the eligible elements this rank owns. The step's last pass is not folded: it is
held where it lives (`hold_last`), and the step's final sweep reads it there:
- k = 2 (the default): `mean` holds pass 1 only, 4 bytes per element; `pair_scores_`
  (bidrop_ds.core.scores) turns (pass 1, pass 2) into the mean and the scores in one sweep. Where
  the backend can keep pass 1 where it lives while pass 2 goes to fresh storage (`hold_first`),
  not even those 4 bytes are copied: the mean is then written into pass 1's own views.
- otherwise Welford's mean and M2, 8 bytes per element whatever k is, the last pass folded in by
  `fold_last`. Welford's update avoids the cancellation of the sum / sum-of-squares form when the
  passes nearly agree, which is exactly the regime Bi-Drop cares about (small spread, large mean).
Buffers are allocated on first use, so a rule that never folds (k = 1, no mask) holds none.
"""

from __future__ import annotations

from typing import Sequence

import torch

# On CPU, gradient pieces longer than this are folded chunk by chunk through one reused buffer
# (cache-resident, no full-size temporary); elsewhere, and for shorter pieces, torch._foreach_*.
CHUNK = {"cpu": 1 << 16}


def flat_pieces(grad: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A gradient given as one flat tensor or as pieces (views where it lives, any shape), as 1-D views."""
    if isinstance(grad, torch.Tensor):
        if grad.dim() != 1:
            raise ValueError(f"PassStatistics: a gradient given as one tensor must be flat, got shape "
                             f"{tuple(grad.shape)}")
        return [grad]
    return [g.reshape(-1) for g in grad]


class PassStatistics:
    """Running mean and M2 = sum_j (g_j - mean)^2 over the passes folded in so far, plus the
    step's last pass, held unfolded (`last`) until the final sweep."""

    def __init__(self, numel: int, device: torch.device | str = "cpu") -> None:
        self.numel = numel
        self.device = torch.device(device)
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self.count = 0                              # passes folded in or held
        self.first: list[torch.Tensor] | None = None  # pass 1 held where it lives (views), if so
        self.last: list[torch.Tensor] | None = None  # the held last pass (views), until folded
        self.spread_max: torch.Tensor | None = None  # the largest spread, set by the pair sweep

    @property
    def mean(self) -> torch.Tensor:
        """The running mean (after the pair sweep: the mean of the two passes), fp32, in this
        object's own buffer: a pass 1 held where it lives is copied in first (see `mean_pieces`)."""
        if self._mean is None:
            self._mean = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        if self.first is not None:
            first, self.first = self.first, None
            if first:
                torch._foreach_copy_(list(self._mean.split([piece.numel() for piece in first])), first)
        return self._mean

    def mean_pieces(self) -> list[torch.Tensor]:
        """The running mean as pieces of its flat layout: pass 1's own views where it is held
        (`hold_first`), else [`mean`]. The pair sweep writes the mean there, with no copy."""
        return self.first if self.first is not None else [self.mean]

    @property
    def m2(self) -> torch.Tensor:
        """M2 (allocated on first use; the scores of the Welford path are written into it)."""
        if self._m2 is None:
            self._m2 = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        return self._m2

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers allocated so far (4 per element for k = 2; 8 on the Welford path)."""
        return sum(t.nbytes for t in (self._mean, self._m2) if t is not None)

    def reset(self) -> None:
        """Forget all passes (start of a step). The first fold overwrites the mean, and M2 is
        zeroed only where it will accumulate."""
        self.count = 0
        self.first = None
        self.last = None
        self.spread_max = None

    def hold_first(self, grad: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Count pass 1 without copying it: it stays in `grad` (views the caller keeps valid, and
        apart from where the next passes land, until the step's update is written). The pair
        sweep writes the mean there; any other use copies it into `mean` first."""
        if self.count:
            raise ValueError(f"PassStatistics.hold_first: {self.count} passes already counted")
        pieces = flat_pieces(grad)
        self._check(pieces)
        self.first = [piece for piece in pieces if piece.numel()]
        self.count = 1

    def drop_held(self) -> None:
        """Forget the views of held passes (once the update is written), so their storage can go."""
        self.first = None
        self.last = None

    def hold_last(self, grad: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Count the step's last pass without reading it: it stays in `grad` (views where it
        lives, valid until the gradient is written), for the final sweep or `fold_last`."""
        pieces = flat_pieces(grad)
        self._check(pieces)
        self.last = pieces
        self.count += 1

    def fold_last(self) -> None:
        """Fold the held last pass into the mean / M2 (the Welford path; a no-op if none is held)."""
        if self.last is None:
            return
        last, self.last = self.last, None
        self.count -= 1
        self._fold(last)

    def update(self, grad: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Fold in one pass's gradient: a flat tensor as long as the buffers, or a list of tensors
        (views where the gradient lives) whose concatenation is, handled with `torch._foreach_*`
        (on CPU, pieces longer than CHUNK chunk by chunk: the same arithmetic, bit for bit).

        With delta = g - mean_old: mean_new = mean_old + delta / n and
        M2 += delta * (g - mean_new) = delta^2 * (n - 1) / n, so one temporary suffices.
        """
        grads = flat_pieces(grad)
        self._check(grads)
        self._fold(grads)

    def _fold(self, grads: list[torch.Tensor]) -> None:
        self.count += 1
        grads = [g for g in grads if g.numel()]
        if not grads:  # this rank owns no eligible element (e.g. a ZeRO partition of embeddings only)
            return
        sizes = [g.numel() for g in grads]
        means = list(self.mean.split(sizes))
        if self.count == 1:
            # First pass: mean = g exactly, M2 stays 0 (keeps k = 1 bit-identical to vanilla).
            torch._foreach_copy_(means, grads)
            return
        if self.count == 2:
            self.m2.zero_()
        m2s = list(self.m2.split(sizes))
        alpha, weight = 1.0 / self.count, (self.count - 1) / self.count
        step = CHUNK.get(self.device.type)
        long = [i for i, g in enumerate(grads) if step and g.numel() > step]
        if long:  # the same operations as below, element for element, on cache-sized pieces
            buffer = torch.empty(step, dtype=torch.float32, device=self.device)
            for i in long:
                for start in range(0, sizes[i], step):
                    end = min(start + step, sizes[i])
                    delta = torch.sub(grads[i][start:end], means[i][start:end], out=buffer[:end - start])
                    means[i][start:end].add_(delta, alpha=alpha)
                    m2s[i][start:end].addcmul_(delta, delta, value=weight)
            short = [i for i in range(len(grads)) if sizes[i] <= step]
            grads, means, m2s = [grads[i] for i in short], [means[i] for i in short], [m2s[i] for i in short]
            if not grads:
                return
        delta = torch._foreach_sub([g.float() for g in grads], means)
        torch._foreach_add_(means, delta, alpha=alpha)
        torch._foreach_addcmul_(m2s, delta, delta, value=weight)

    def _check(self, pieces: list[torch.Tensor]) -> None:
        total = sum(piece.numel() for piece in pieces)
        if total != self.numel:
            raise ValueError(f"PassStatistics: gradient pieces of {total} elements (shapes "
                             f"{[tuple(g.shape) for g in pieces][:4]}...), expected {self.numel}")

    def spread_is_zero(self) -> bool:
        """True if at least two passes were seen and all were equal on every element: no dropout
        acted. After the pair sweep it reads the sweep's largest spread; on the Welford path one
        max over M2 (valid until the scores overwrite it)."""
        if self.count < 2 or self.numel == 0:
            return False
        if self.spread_max is not None:
            return float(self.spread_max) == 0.0
        return self.last is None and float(self.m2.max()) == 0.0

    def is_finite(self) -> bool:
        """False if any mean or M2 element (or of a held last pass) is inf or NaN.

        Uses reductions that propagate NaN instead of an elementwise mask, so no P-sized temporary.
        After the pair sweep the mean covers both passes (inf - inf and NaN give NaN there).
        """
        if self.numel == 0:
            return True
        extremes = []
        if self.last is not None and any(piece.numel() for piece in self.last):
            extremes += torch._foreach_norm([piece for piece in self.last if piece.numel()], float("inf"))
        folded = self.count - (self.last is not None)
        if self.first is not None:
            extremes += torch._foreach_norm(self.first, float("inf")) if self.first else []
        elif folded:
            extremes += list(torch.aminmax(self.mean))
            if folded > 1 and self.spread_max is None:
                extremes.append(self.m2.max())
        return bool(torch.isfinite(torch.stack(extremes)).all()) if extremes else True
