"""Streaming per-element statistics of the k per-pass gradients (Welford's mean / M2).

Each pass's gradient is folded in as it arrives, so no pass is ever stored: the state is two
fp32 buffers over the elements this rank owns (8 bytes per element, whatever k is). Welford's
update avoids the cancellation of the sum / sum-of-squares form when the passes nearly agree,
which is exactly the regime Bi-Drop cares about (small spread, large mean).
"""

from __future__ import annotations

from typing import Sequence

import torch

# On CPU, gradient pieces longer than this are folded chunk by chunk through one reused buffer
# (cache-resident, no full-size temporary); elsewhere, and for shorter pieces, torch._foreach_*.
CHUNK = {"cpu": 1 << 16}


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
        (views where the gradient lives) whose concatenation is, handled with `torch._foreach_*`
        (on CPU, pieces longer than CHUNK chunk by chunk: the same arithmetic, bit for bit).

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
        alpha, weight = 1.0 / self.count, (self.count - 1) / self.count
        step = CHUNK.get(self.mean.device.type)
        long = [i for i, g in enumerate(grads) if step and g.numel() > step]
        if long:  # the same operations as below, element for element, on cache-sized pieces
            buffer = torch.empty(step, dtype=torch.float32, device=self.mean.device)
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

    def spread_is_zero(self) -> bool:
        """True if at least two passes are folded in and all were equal on every element (M2 all 0):
        no dropout acted. One max over M2; valid until the scores overwrite it."""
        return self.count > 1 and self.m2.numel() > 0 and float(self.m2.max()) == 0.0

    def is_finite(self) -> bool:
        """False if any mean or M2 element is inf or NaN (a non-finite pass poisons both).

        Uses reductions that propagate NaN instead of an elementwise mask, so no P-sized temporary.
        """
        if self.mean.numel() == 0:
            return True
        lo, hi = torch.aminmax(self.mean)
        extremes = torch.stack([lo, hi, self.m2.max()])
        return bool(torch.isfinite(extremes).all())
