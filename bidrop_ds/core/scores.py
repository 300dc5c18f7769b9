"""Bi-Drop element scores from the pass statistics (our specification of arXiv 2305.14760).

  F_per = |m| / (s + eps)          s = population std over the k passes = sqrt(M2 / k)
  F_sca = |m| / (|theta| + eps)
  score = F_per * F_sca  ("product", default) | F_per ("perturbation") | F_sca ("scaling")
        | uniform random ("random", an ablation)

Scores are non-negative (or +inf), which the selection relies on. The work runs over chunks of
CHUNK elements on CPU (two chunk-sized buffers, the operands stay in cache), so the scores cost one
read of the mean, M2 and |theta| and one write of M2, with no full-size temporary.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from bidrop_ds.core.ranges import complement
from bidrop_ds.core.stats import PassStatistics

CHUNK = {"cpu": 1 << 16}  # elements per step; elsewhere DEFAULT_CHUNK
DEFAULT_CHUNK = 1 << 24


def _spans(pieces: Sequence[torch.Tensor], keep: list[tuple[int, int]], device: torch.device
           ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, the matching slice of the pieces' concatenation) covering the `keep` ranges,
    each span inside one piece and at most one chunk long."""
    step = CHUNK.get(device.type, DEFAULT_CHUNK)
    flats, offsets, offset = [piece.reshape(-1) for piece in pieces], [], 0
    for flat in flats:
        offsets.append(offset)
        offset += flat.numel()
    for lo, hi in keep:
        for flat, base in zip(flats, offsets):
            first, last = max(lo, base), min(hi, base + flat.numel())
            for start in range(first, last, step):
                end = min(start + step, last)
                yield start, end, flat[start - base:end - base]


def scores_into_m2(stats: PassStatistics, abs_param: torch.Tensor | Sequence[torch.Tensor], kind: str,
                   eps: float, generator: torch.Generator | None = None, grad_scale: float = 1.0,
                   ineligible: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """Compute the scores in place of `stats.m2` (no longer needed after the last pass) and return it.

    `abs_param` is |theta| over the same elements (any float dtype), or a list of tensors whose
    concatenation is (no flat copy needed); the absolute value is taken here, so the signed
    parameters may be passed as well. Writing into M2 keeps the plugin's state at two fp32
    buffers: the mean survives, since it is the update.
    `grad_scale` is the factor the folded gradients carry (an fp16 loss scale, say): eps is added in
    unscaled units (s + eps * scale), so F_per is exactly that of the unscaled gradients and the
    other factors only gain a uniform factor: the mask does not depend on the scale.
    `ineligible`: (start, end) ranges of elements that are not candidates; they get the score -1
    without being computed (what `mark_ineligible(scores, -1.0)` does afterwards, at no cost).
    """
    out, mean, k = stats.m2, stats.mean, stats.count
    if k < 1:
        raise ValueError("scores_into_m2: no pass has been folded into the statistics")
    if kind not in ("product", "perturbation", "scaling", "random"):
        raise ValueError(f"unknown score kind {kind!r}")
    if k == 1:
        out.zero_()  # one pass: no spread (M2 is not accumulated before a second pass)
    keep = complement(out.numel(), ineligible)
    if kind == "random":  # drawn over all elements, so the draws do not depend on `ineligible`
        out.uniform_(0.0, 1.0, generator=generator)
        keep = []
    pieces = [abs_param] if isinstance(abs_param, torch.Tensor) else list(abs_param)
    if keep and sum(piece.numel() for piece in pieces) != out.numel():
        raise ValueError(f"scores_into_m2: abs_param has {sum(p.numel() for p in pieces)} elements, "
                         f"the statistics {out.numel()}")
    step = min(CHUNK.get(out.device.type, DEFAULT_CHUNK), out.numel())
    kernel = _ScoreKernel(kind, k, eps, grad_scale, step, out.device)
    for start, end, theta in _spans(pieces, keep, out.device):
        kernel(out[start:end], mean[start:end], theta)
    for start, end in complement(out.numel(), complement(out.numel(), ineligible)):
        out[start:end] = -1.0                                  # not candidates
    return out


class _ScoreKernel:
    """The score of one chunk from its M2 (in `score`, overwritten), mean and theta, through two
    chunk-sized buffers: F_per = |m| / (sqrt(M2 / k) + eps) and F_sca = |m| / (|theta| + eps)."""

    def __init__(self, kind: str, k: int, eps: float, grad_scale: float, step: int, device: torch.device) -> None:
        self.kind, self.k, self.eps = kind, k, eps
        self.spread_eps = eps * grad_scale  # s + eps in unscaled units
        self.abs_mean = torch.empty(step, dtype=torch.float32, device=device)
        self.abs_theta = torch.empty(step if kind != "perturbation" else 0, dtype=torch.float32, device=device)

    def __call__(self, score: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> None:
        length = score.numel()
        a = torch.abs(mean, out=self.abs_mean[:length])
        if self.kind != "scaling":                             # F_per = |m| / (s + eps)
            score.div_(self.k).sqrt_().add_(self.spread_eps)
            torch.div(a, score, out=score)
        if self.kind != "perturbation":                        # F_sca = |m| / (|theta| + eps)
            t = self.abs_theta[:length]
            if theta.dtype == torch.float32:
                torch.abs(theta, out=t)
            else:
                t.copy_(theta).abs_()
            t.add_(self.eps)
            if self.kind == "scaling":
                torch.div(a, t, out=score)
            else:
                score.mul_(a.div_(t))                          # F_per * F_sca (no overflow in between)


def _aligned(*layouts: Sequence[torch.Tensor], step: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching slices of piece lists that lay out one flat range each, every slice inside one
    piece of its list and at most `step` long (the pieces of each list, concatenated, line up)."""
    iterators = [iter(layout) for layout in layouts]
    current: list[torch.Tensor | None] = [None] * len(layouts)
    used = [0] * len(layouts)
    while True:
        for i, it in enumerate(iterators):
            while current[i] is None or used[i] == current[i].numel():
                piece = next(it, None)
                if piece is None:
                    return
                current[i], used[i] = piece.reshape(-1), 0
        length = min(step, *(piece.numel() - u for piece, u in zip(current, used)))
        yield tuple(piece[u:u + length] for piece, u in zip(current, used))
        used = [u + length for u in used]


def pair_scores_(stats: PassStatistics, abs_param: torch.Tensor | Sequence[torch.Tensor], kind: str, eps: float,
                 generator: torch.Generator | None = None, grad_scale: float = 1.0) -> list[torch.Tensor]:
    """k = 2 in one sweep: from pass 1 in `stats.mean_pieces()` (the statistics' buffer, or pass 1's
    own views where it is held there) and pass 2 held in `stats.last` (fp32 views where the gradient
    lives), write the mean of the two over pass 1 and the scores into pass 2's own views, which
    are returned (a list of views: no buffer of the plugin's).

    The arithmetic is Welford's for n = 2 (delta = g2 - g1, mean = g1 + delta / 2,
    M2 = delta^2 / 2), then the scores of `scores_into_m2`; `abs_param` is theta (any float dtype,
    one tensor or pieces) over the same elements. `stats.spread_max` records the largest M2
    (0: the two passes were equal).
    """
    if stats.count != 2 or stats.last is None:
        raise ValueError(f"pair_scores_: needs pass 1 folded and pass 2 held (count {stats.count})")
    if kind not in ("product", "perturbation", "scaling", "random"):
        raise ValueError(f"unknown score kind {kind!r}")
    last, means = stats.last, stats.mean_pieces()
    pieces = [abs_param] if isinstance(abs_param, torch.Tensor) else list(abs_param)
    if any(piece.dtype != torch.float32 for piece in (*last, *means)):
        raise ValueError("pair_scores_: both passes must be held in fp32 (their views receive the mean "
                         "and the scores)")
    if sum(piece.numel() for piece in pieces) != stats.numel:
        raise ValueError(f"pair_scores_: abs_param has {sum(p.numel() for p in pieces)} elements, "
                         f"the statistics {stats.numel}")
    device = stats.device
    step = max(1, min(CHUNK.get(device.type, DEFAULT_CHUNK), stats.numel))
    delta = torch.empty(step, dtype=torch.float32, device=device)
    kernel = _ScoreKernel(kind, 2, eps, grad_scale, step, device)
    spread_max = torch.zeros((), dtype=torch.float32, device=device)
    for g2, m, theta in _aligned(last, means, pieces, step=step):
        d = delta[:g2.numel()]
        torch.sub(g2, m, out=d)
        m.add_(d, alpha=0.5)                                   # the mean
        torch.mul(d, d, out=g2).mul_(0.5)                      # M2, in place of pass 2
        torch.maximum(spread_max, g2.max(), out=spread_max)
        if kind != "random":
            kernel(g2, m, theta)
    if kind == "random":
        for grad in last:
            grad.uniform_(0.0, 1.0, generator=generator)
    stats.last, stats.spread_max = None, spread_max
    return list(last)


def masked_mean_into_(scores: Sequence[torch.Tensor], mean: torch.Tensor | Sequence[torch.Tensor],
                      threshold: float, divisor: float = 1.0) -> None:
    """scores := mean * (scores >= threshold) / divisor, piece by piece in place (the pair path's
    final write: the scores sit where the gradient lives, so this is the update). `mean`: one
    flat tensor or pieces of that layout (`PassStatistics.mean_pieces()`)."""
    means = [mean] if isinstance(mean, torch.Tensor) else list(mean)
    if not means:
        return
    step = CHUNK.get(means[0].device.type, DEFAULT_CHUNK)
    for score, m in _aligned(scores, means, step=step):
        torch.ge(score, threshold, out=score)
        score.mul_(m)
        if divisor != 1.0:
            score.div_(divisor)


def mask_update_(update: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """update *= (scores >= threshold), in place; `scores` is consumed (left holding 1.0 / 0.0).

    The same as `update.masked_fill_(scores < threshold, 0.0)` except for the sign of the zeros
    written (a dropped negative mean gives -0.0) and NaN scores (dropped here); several times
    faster on CPU, where no boolean mask is built and the fill is not element by element.
    """
    if update.shape != scores.shape or scores.dtype != update.dtype:
        raise ValueError(f"mask_update_: update {tuple(update.shape)} {update.dtype} and scores "
                         f"{tuple(scores.shape)} {scores.dtype} must match")
    step = CHUNK.get(update.device.type, DEFAULT_CHUNK)
    flat_update, flat_scores = update.view(-1), scores.view(-1)
    for start in range(0, flat_update.numel(), step):
        keep = flat_scores[start:start + step]
        torch.ge(keep, threshold, out=keep)
        flat_update[start:start + step].mul_(keep)
    return update
