"""The Bi-Drop specification (../shared/BIDROP.md, "One Bi-Drop step") computed literally in
float64 from the k stored per-pass gradients. Tests compare the streaming, distributed
implementation against it; it shares no code with bidrop_ds on purpose."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch


@dataclass
class OracleStep:
    mean: torch.Tensor     # m, float64
    std: torch.Tensor      # s, population std, float64
    scores: torch.Tensor   # S (product / perturbation / scaling), float64
    n: int                 # number of elements to keep
    tau: float | torch.Tensor  # n-th largest score (per_tensor groups: each element's tensor's)
    mask: torch.Tensor     # bool, ties at tau kept
    update: torch.Tensor   # the gradient the optimizer receives, float64


def oracle_step(pass_grads: list[torch.Tensor], abs_param: torch.Tensor, p: float, score: str = "product",
                eps: float = 1e-8, rescale: bool = False, groups: Sequence[int] | None = None) -> OracleStep:
    """One step on flat eligible elements: `pass_grads` are the k per-pass gradients, `abs_param` |theta|.

    `groups` (threshold "per_tensor"): the sizes of the consecutive tensors the flat elements form;
    each keeps its own top p (n its own ceil(p N_t)), and `tau` is then each element's tensor's tau."""
    g = torch.stack([x.double() for x in pass_grads])
    k = g.shape[0]
    m = g.sum(0) / k
    s = torch.sqrt(((g - m) ** 2).sum(0) / k)
    f_per = m.abs() / (s + eps)
    f_sca = m.abs() / (abs_param.double() + eps)
    scores = {"product": f_per * f_sca, "perturbation": f_per, "scaling": f_sca}[score]
    N = m.numel()
    if k == 1 or p == 1:  # vanilla: everything kept
        n, tau, mask = N, float("-inf"), torch.ones(N, dtype=torch.bool)
    elif groups is not None:
        assert sum(groups) == N, (list(groups), N)
        picks = [top_p_mask(part, p) for part in scores.split(list(groups))]
        n = sum(max(1, math.ceil(Fraction(str(p)) * size)) for size in groups)
        mask = torch.cat([part_mask for part_mask, _ in picks])
        tau = torch.cat([torch.full((size,), part_tau, dtype=torch.float64)
                         for size, (_, part_tau) in zip(groups, picks)])
    else:
        n = max(1, math.ceil(Fraction(str(p)) * N))
        tau = torch.sort(scores, descending=True).values[n - 1].item()
        mask = scores >= tau
    update = m * mask
    if rescale:
        update = update / p
    return OracleStep(mean=m, std=s, scores=scores, n=n, tau=tau, mask=mask, update=update)


def eligible_names(names: list[str], include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    return [n for n in names if any(re.search(x, n) for x in include) and not any(re.search(x, n) for x in exclude)]


def borderline(oracle: OracleStep, rel: float = 1e-5) -> torch.Tensor:
    """Elements whose oracle score is so close to tau that fp32 rounding may put them either side."""
    return (oracle.scores - oracle.tau).abs() <= rel * abs(oracle.tau)


def assert_mask_matches(mask: torch.Tensor, oracle: OracleStep, ignore: torch.Tensor | None = None,
                        rel: float = 1e-5) -> None:
    """The mask equals the oracle's except, at most, on borderline elements (and on `ignore`)."""
    differ = mask.cpu() != oracle.mask
    if ignore is not None:
        differ &= ~ignore
    hard = differ & ~borderline(oracle, rel)
    assert not hard.any(), f"{int(differ.sum())} mask elements differ from the oracle, {int(hard.sum())} not borderline"


def top_p_mask(scores: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(mask of the n = max(1, ceil(p N)) largest scores with ties at tau kept, tau), float64 sort."""
    n = max(1, math.ceil(Fraction(str(p)) * scores.numel()))
    tau = torch.sort(scores.double(), descending=True).values[n - 1].item()
    return scores >= tau, tau


def near_threshold(scores: torch.Tensor, tau: float, rel: float = 1e-5) -> torch.Tensor:
    """Elements whose float64 score is so close to tau that fp32 accumulation may put them either side."""
    return (scores - tau).abs() <= rel * abs(tau)
