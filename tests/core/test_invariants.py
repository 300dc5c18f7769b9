"""Spec invariants on the core pipeline (stats -> scores -> threshold -> mask)."""

from __future__ import annotations

import pytest
import torch

from bidrop_ds.core import LocalCommunicator, PassStatistics, global_threshold, kept_count, scores_into_m2


def _mask(passes: list[torch.Tensor], abs_param: torch.Tensor, p: float, kind: str,
          grad_scale: float = 1.0) -> torch.Tensor:
    stats = PassStatistics(passes[0].numel())
    for grad in passes:
        stats.update(grad)
    scores = scores_into_m2(stats, abs_param, kind, eps=1e-8, grad_scale=grad_scale)
    found = global_threshold(scores, kept_count(p, scores.numel()), LocalCommunicator())
    return scores >= found.value


@pytest.mark.parametrize("kind", ["product", "perturbation", "scaling"])
def test_uniform_gradient_scale_leaves_the_mask_unchanged(kind):
    """Loss scaling (2^-10 .. 2^10), declared as grad_scale, must not change a single mask element."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(20_000, generator=g) * 1e-3
    passes = [shared + torch.randn(20_000, generator=g) * 5e-4 for _ in range(3)]
    abs_param = (torch.randn(20_000, generator=g) * 0.02).abs()
    reference = _mask(passes, abs_param, 0.3, kind)
    for exponent in range(-10, 11, 2):
        scaled = [x * 2.0 ** exponent for x in passes]
        mask = _mask(scaled, abs_param, 0.3, kind, grad_scale=2.0 ** exponent)
        assert torch.equal(mask, reference), f"scale 2^{exponent} changed {int((mask != reference).sum())} elements"


def test_undeclared_scale_moves_eps_relative_to_the_spread():
    """Why grad_scale exists: scaling the gradients by c without declaring it acts as eps / c."""
    g = torch.Generator().manual_seed(1)
    passes = [torch.randn(20_000, generator=g) * 1e-6 for _ in range(2)]
    abs_param = torch.rand(20_000, generator=g)
    reference = _mask(passes, abs_param, 0.3, "perturbation")
    assert not torch.equal(_mask([x * 2.0 ** -10 for x in passes], abs_param, 0.3, "perturbation"), reference)
