"""Bi-Drop element scores from the pass statistics (our specification of arXiv 2305.14760).

  F_per = |m| / (s + eps)          s = population std over the k passes = sqrt(M2 / k)
  F_sca = |m| / (|theta| + eps)
  score = F_per * F_sca  ("product", default) | F_per ("perturbation") | F_sca ("scaling")
        | uniform random ("random", an ablation)

Scores are non-negative (or +inf), which the selection relies on.
"""

from __future__ import annotations

import torch

from bidrop_ds.core.stats import PassStatistics


def scores_into_m2(stats: PassStatistics, abs_param: torch.Tensor, kind: str, eps: float,
                   generator: torch.Generator | None = None, grad_scale: float = 1.0) -> torch.Tensor:
    """Compute the scores in place of `stats.m2` (no longer needed after the last pass) and return it.

    `abs_param` is |theta| over the same elements (fp32 or any float dtype). Writing into M2 keeps
    the plugin's state at two fp32 buffers: the mean survives, since it is the update.
    `grad_scale` is the factor the folded gradients carry (an fp16 loss scale, say): eps is added in
    unscaled units (s + eps * scale), so F_per is exactly that of the unscaled gradients and the
    other factors only gain a uniform factor: the mask does not depend on the scale.
    """
    out, mean, k = stats.m2, stats.mean, stats.count
    if k < 1:
        raise ValueError("scores_into_m2: no pass has been folded into the statistics")
    if kind == "random":
        return out.uniform_(0.0, 1.0, generator=generator)
    if kind in ("product", "perturbation"):
        abs_mean = mean.abs()
        out.div_(k).sqrt_().add_(eps * grad_scale)        # s + eps (in unscaled units)
        torch.div(abs_mean, out, out=out)                 # F_per
        if kind == "product":                             # F_per * F_sca (no overflow in between)
            out.mul_(abs_mean.div_(abs_param.float().add(eps)))
        return out
    if kind == "scaling":
        return torch.div(mean.abs(), abs_param.float().add(eps), out=out)
    raise ValueError(f"unknown score kind {kind!r}")
