"""Streaming per-element statistics of the k per-pass gradients (Welford's mean / M2).

Each pass's gradient is folded in as it arrives, so no pass is ever stored: the state is two
fp32 buffers over the elements this rank owns (8 bytes per element, whatever k is). Welford's
update avoids the cancellation of the sum / sum-of-squares form when the passes nearly agree,
which is exactly the regime Bi-Drop cares about (small spread, large mean).
"""

from __future__ import annotations

from typing import Sequence

import torch


class PassStatistics:
    """Running mean and M2 = sum_j (g_j - mean)^2 over the passes folded in so far."""

    def __init__(self, numel: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(numel, dtype=torch.float32, device=device)
        self.m2 = torch.zeros(numel, dtype=torch.float32, device=device)
        self.count = 0

    def reset(self) -> None:
        """Forget all passes (start of a step)."""
        self.mean.zero_()
        self.m2.zero_()
        self.count = 0

    def update(self, grad: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Fold in one pass's gradient: a flat tensor as long as the buffers, or a list of tensors
        (views where the gradient lives) whose concatenation is, handled with `torch._foreach_*`.

        With delta = g - mean_old: mean_new = mean_old + delta / n and
        M2 += delta * (g - mean_new) = delta^2 * (n - 1) / n, so one temporary suffices.
        """
        grads = [grad] if isinstance(grad, torch.Tensor) else [g.reshape(-1) for g in grad]
        sizes = [g.numel() for g in grads]
        if sum(sizes) != self.mean.numel() or any(g.dim() != 1 for g in grads):
            raise ValueError(f"PassStatistics.update: gradient pieces of {sum(sizes)} elements "
                             f"(shapes {[tuple(g.shape) for g in grads][:4]}...), expected one flat "
                             f"{self.mean.numel()}")
        means, m2s = list(self.mean.split(sizes)), list(self.m2.split(sizes))
        self.count += 1
        if self.count == 1:
            # First pass: mean = g exactly, M2 stays 0 (keeps k = 1 bit-identical to vanilla).
            torch._foreach_copy_(means, grads)
            return
        delta = torch._foreach_sub([g.float() for g in grads], means)
        torch._foreach_add_(means, delta, alpha=1.0 / self.count)
        torch._foreach_addcmul_(m2s, delta, delta, value=(self.count - 1) / self.count)

    def is_finite(self) -> bool:
        """False if any mean or M2 element is inf or NaN (a non-finite pass poisons both).

        Uses reductions that propagate NaN instead of an elementwise mask, so no P-sized temporary.
        """
        if self.mean.numel() == 0:
            return True
        lo, hi = torch.aminmax(self.mean)
        extremes = torch.stack([lo, hi, self.m2.max()])
        return bool(torch.isfinite(extremes).all())
