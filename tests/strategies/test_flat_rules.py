"""Each mask rule on flat tensors with a LocalCommunicator (no model, no driver), against
tests/oracle.py: the mask, the update written, the kept count and the threshold."""

from __future__ import annotations

import pytest
import torch

from bidrop_ds import BiDropConfig
from bidrop_ds.backends.partition import ParameterSlice
from bidrop_ds.strategies import BiDropRule, ChildTuningD, ChildTuningF, Dps, Unmasked, make_rule
from tests.oracle import assert_mask_matches, borderline, near_threshold, oracle_step, top_p_mask
from tests.strategies.flat import flat_context, fold_passes

N = 1000
P = 0.3


def _passes(k: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    """k gradients that share a signal and differ by a smaller noise (like dropout passes)."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(N, generator=g)
    return [scale * (signal + 0.3 * torch.randn(N, generator=g)) for _ in range(k)]


def _weights() -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(99))


@pytest.mark.parametrize("k, score, rescale, last_dtype, scale", [
    (2, "product", False, torch.float32, 1.0),        # the pair path: the update lands in pass 2's tensor
    (2, "product", False, torch.float32, 1024.0),     # a loss scale: the same mask, the update keeps it
    (2, "perturbation", True, torch.float32, 1.0),
    (2, "product", False, torch.bfloat16, 1.0),       # a 16-bit last pass: Welford, the update in the mean
    (3, "scaling", False, torch.float32, 1.0),
    (4, "product", True, torch.float32, 1.0),
])
def test_bidrop_rule_matches_oracle(k, score, rescale, last_dtype, scale):
    weights = _weights()
    context = flat_context(BiDropConfig(k=k, p=P, score=score, rescale=rescale), weights)
    passes = _passes(k, seed=k, scale=scale)
    passes[-1] = passes[-1].to(last_dtype)
    oracle = oracle_step([g.double() / scale for g in passes], weights.abs(), P, score, rescale=rescale)
    rule = make_rule(context)
    assert isinstance(rule, BiDropRule)
    fold_passes(context.stats, passes)
    in_place = rule.prepare(step=0, grad_scale=scale)
    assert in_place == (k == 2 and last_dtype == torch.float32)
    outcome = rule.decide(step=0, finite=True, grad_scale=scale)
    update = (passes[-1] if in_place else context.stats.mean).double() / scale
    assert_mask_matches(update != 0, oracle)
    sure = oracle.mask & ~borderline(oracle)
    torch.testing.assert_close(update[sure], oracle.update[sure], rtol=1e-5, atol=1e-6)
    assert abs(outcome.kept - oracle.n) <= int(borderline(oracle).sum())
    assert int((update != 0).sum()) == outcome.kept  # what it reports is what it wrote
    assert outcome.threshold == pytest.approx(oracle.tau * scale ** (score != "perturbation"), rel=1e-5)


def test_bidrop_random_score_is_the_steps_draw():
    """score='random': the mask depends only on the step's generator (same step, same mask)."""
    masks = []
    for step in (3, 3, 4):
        context = flat_context(BiDropConfig(p=P, score="random"), _weights())
        passes = _passes(2, seed=0)
        rule = make_rule(context)
        fold_passes(context.stats, passes)
        rule.prepare(step, 1.0)
        outcome = rule.decide(step, True, 1.0)
        masks.append(passes[-1] != 0)
        assert outcome.kept == int(masks[-1].sum()) == 300
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("config", [BiDropConfig(k=1), BiDropConfig(p=1.0), BiDropConfig(strategy="vanilla")])
def test_unmasked_update_is_the_mean(config):
    context = flat_context(config, _weights())
    rule = make_rule(context)
    assert isinstance(rule, Unmasked)
    passes = _passes(config.k, seed=1)
    mean = oracle_step(passes, _weights().abs(), 1.0).mean
    fold_passes(context.stats, passes)
    in_place = rule.prepare(0, 1.0)
    assert in_place == (config.k == 1)
    assert rule.decide(0, True, 1.0).kept == N
    update = passes[-1] if in_place else context.stats.mean
    torch.testing.assert_close(update.double(), mean)


def test_childtuning_f_keeps_the_steps_bernoulli_draw_scaled():
    context = flat_context(BiDropConfig(strategy="childtuning-f", p=P), _weights())
    rule = make_rule(context)
    assert isinstance(rule, ChildTuningF)
    for step in (0, 1):
        grad = _passes(1, seed=10 + step)[0]
        fold_passes(context.stats, [grad.clone()])
        assert rule.prepare(step, 1.0) is False
        outcome = rule.decide(step, True, 1.0)
        keep = torch.empty(N).uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(step)) < P
        torch.testing.assert_close(context.stats.mean, torch.where(keep, grad / P, torch.zeros(N)))
        assert outcome.kept == int(keep.sum()) and outcome.threshold is None


def test_childtuning_d_fixes_the_top_p_of_the_fisher_sum():
    context = flat_context(BiDropConfig(strategy="childtuning-d", p=P), _weights())
    rule = make_rule(context)
    assert isinstance(rule, ChildTuningD)
    estimation = [_passes(1, seed=20 + i)[0] for i in range(3)]
    for grad in estimation:
        rule.accumulate(grad, 1.0)
    rule.finish()
    fisher = sum(g.double() ** 2 for g in estimation)
    mask, tau = top_p_mask(fisher, P)
    sure = ~near_threshold(fisher, tau)
    for step in (0, 1):
        grad = _passes(1, seed=30 + step)[0]
        fold_passes(context.stats, [grad.clone()])
        rule.prepare(step, 1.0)
        outcome = rule.decide(step, True, 1.0)
        assert torch.equal((context.stats.mean != 0)[sure], mask[sure])
        torch.testing.assert_close(context.stats.mean[mask & sure], grad[mask & sure])
        assert abs(outcome.kept - int(mask.sum())) <= int((~sure).sum())
        assert int((context.stats.mean != 0).sum()) == outcome.kept
        assert outcome.threshold == pytest.approx(tau, rel=1e-5)


def test_dps_masks_each_parameter_by_the_last_full_phase():
    """Window 2: steps 0-1 update everything and sum the squares; steps 2-3 keep each parameter's
    top p of that sum. Parameter `a` lies in two ranges of the layout, `b` between them."""
    a, b = ((0, 300), (700, N)), ((300, 700),)
    slices = [ParameterSlice("a", 600, a), ParameterSlice("b", 400, b)]
    context = flat_context(BiDropConfig(strategy="dps", p=P, dps_window=2), _weights(), slices)
    rule = make_rule(context)
    assert isinstance(rule, Dps)
    grads = [_passes(1, seed=40 + step)[0] for step in range(4)]
    fisher = grads[0].double() ** 2 + grads[1].double() ** 2
    mask, sure, kept = torch.zeros(N, dtype=torch.bool), torch.ones(N, dtype=torch.bool), 0
    for ranges in (a, b):
        index = torch.cat([torch.arange(start, end) for start, end in ranges])
        mask[index], tau = top_p_mask(fisher[index], P)
        sure[index] = ~near_threshold(fisher[index], tau)
        kept += int(mask[index].sum())
    for step, grad in enumerate(grads):
        fold_passes(context.stats, [grad.clone()])
        rule.prepare(step, 1.0)
        outcome = rule.decide(step, True, 1.0)
        update = context.stats.mean
        if step < 2:
            assert outcome.kept == N and torch.equal(update, grad)
        else:
            assert torch.equal((update != 0)[sure], mask[sure])
            torch.testing.assert_close(update[mask & sure], grad[mask & sure])
            assert abs(outcome.kept - kept) <= int((~sure).sum())
            assert int((update != 0).sum()) == outcome.kept


@pytest.mark.parametrize("strategy", ["bidrop", "vanilla", "childtuning-f", "childtuning-d", "dps"])
def test_a_non_finite_step_is_skipped(strategy):
    context = flat_context(BiDropConfig(strategy=strategy, p=P), _weights())
    rule = make_rule(context)
    if strategy == "childtuning-d":
        rule.accumulate(_passes(1, seed=0)[0], 1.0)
        rule.finish()
    passes = _passes(context.config.k, seed=2)
    passes[0][5] = float("nan")
    fold_passes(context.stats, passes)
    rule.prepare(0, 1.0)
    assert rule.decide(0, context.stats.is_finite(), 1.0) is None
