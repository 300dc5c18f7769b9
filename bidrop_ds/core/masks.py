"""Element rules of the comparison strategies (../shared/BIDROP.md), on flat fp32 tensors.

- ChildTuning-F: a fresh Bernoulli(p) keep mask each step, kept gradients scaled by 1/p.
- ChildTuning-D and DPS rank elements by Fisher information, the mean squared gradient over
  batches; only the ranking matters, so the sum stands in for the mean.
"""

from __future__ import annotations

import torch


def bernoulli_multiplier_(out: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill `out` with 1/p where a Bernoulli(p) draw keeps the element and 0 elsewhere, in place."""
    return out.uniform_(0.0, 1.0, generator=generator).lt_(p).mul_(1.0 / p)


def accumulate_squares_(fisher: torch.Tensor, grad: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """fisher += (grad / grad_scale)^2, in place: one batch's share of the Fisher information in
    unscaled units, so a loss scale that changes between batches (fp16) does not skew the ranking."""
    return fisher.addcmul_(grad, grad, value=1.0 / (grad_scale * grad_scale))
