"""Each strategy's mask rule against a float64 oracle of the whole model, from the gradients the
plugin read: in one process, and on 2 gloo ranks under DeepSpeed ZeRO-2 and ZeRO-3 (every rank's
shards assembled), with SGD so that a step's effect on each weight shows its gradient."""

from __future__ import annotations

import os

import pytest
import torch

from bidrop_ds import BiDrop, BiDropConfig
from tests.backends.zero_oracle import make_engine
from tests.distributed import run_distributed
from tests.models import random_batch, tiny_bert
from tests.oracle import near_threshold, top_p_mask
from tests.strategies.recording import Recorded, record

LR = 0.5  # the SGD rate of make_engine, used by the single-process runs too
P = 0.3
FISHER_BATCHES = 3
STEPS = 6
WINDOW = 2  # dps: steps 0-1 full, 2-3 masked, 4-5 full


def _config(strategy: str) -> BiDropConfig:
    return BiDropConfig(strategy=strategy, p=P, seed=5, dps_window=WINDOW)


def _batches(rank: int, count: int, offset: int) -> list[dict]:
    return [random_batch(1000 * rank + offset + i, size=4) for i in range(count)]


def _run(bidrop: BiDrop, strategy: str, rank: int) -> Recorded:
    fisher = _batches(rank, FISHER_BATCHES, 100) if strategy == "childtuning-d" else []
    return record(bidrop, fisher, _batches(rank, STEPS, 0))


def _single(strategy: str) -> Recorded:
    model = tiny_bert(seed=0)
    return _run(BiDrop(model, torch.optim.SGD(model.parameters(), lr=LR), _config(strategy)), strategy, 0)


def check_masked_steps(rec: Recorded, steps: range, grads: list[torch.Tensor], masks: list[torch.Tensor],
                       borderline: torch.Tensor, scale: float = 1.0) -> None:
    """Weights outside the mask unchanged bit for bit; inside, moved by LR x scale x gradient."""
    for step, grad, mask in zip(steps, grads, masks):
        before, after = rec.before[step], rec.after[step]
        frozen = ~mask & ~borderline
        assert torch.equal(after[frozen], before[frozen]), f"step {step}: masked weights moved"
        moved = before - LR * scale * grad
        kept = mask & ~borderline
        torch.testing.assert_close(after[kept], moved[kept], rtol=1e-5, atol=1e-6)


def check_childtuning_d(rec: Recorded) -> None:
    fisher = sum(g * g for g in rec.grads[:FISHER_BATCHES])
    mask, tau = top_p_mask(fisher, P)
    step_grads = rec.grads[FISHER_BATCHES:]
    check_masked_steps(rec, range(STEPS), step_grads, [mask] * STEPS, near_threshold(fisher, tau))
    assert all(k == pytest.approx(int(mask.sum()) / mask.numel(), abs=1e-3) for k in rec.kept), rec.kept


def check_dps(rec: Recorded) -> None:
    fisher = rec.grads[0] ** 2 + rec.grads[1] ** 2
    mask = torch.zeros_like(fisher, dtype=torch.bool)
    borderline = torch.zeros_like(mask)
    offset = 0
    for _, numel in rec.names:  # DPS: each parameter's own top p
        piece = slice(offset, offset + numel)
        mask[piece], tau = top_p_mask(fisher[piece], P)
        borderline[piece] = near_threshold(fisher[piece], tau)
        offset += numel
    everything = torch.ones_like(mask)
    masks = [everything, everything, mask, mask, everything, everything]
    check_masked_steps(rec, range(STEPS), rec.grads, masks, borderline)
    assert rec.kept[:2] == [1.0, 1.0] and rec.kept[4:] == [1.0, 1.0], rec.kept
    assert rec.kept[2] == pytest.approx(int(mask.sum()) / mask.numel(), abs=1e-3)


def check_childtuning_f(rec: Recorded) -> None:
    fractions = []
    for step, grad in enumerate(rec.grads):
        before, after = rec.before[step], rec.after[step]
        live = grad != 0
        unchanged = after == before
        moved = before - LR * grad / P  # kept gradients are rescaled by 1/p
        close = (after - moved).abs() <= 1e-5 * moved.abs() + 1e-6
        assert bool((unchanged | close)[live].all()), f"step {step}: an element neither frozen nor moved by g/p"
        kept = (~unchanged & live).sum().item() / live.sum().item()
        fractions.append(kept)
        assert kept == pytest.approx(rec.kept[step], abs=0.02)
        assert kept == pytest.approx(P, abs=0.05)
    masks = [(a != b) for a, b in zip(rec.before, rec.after)]
    assert not torch.equal(masks[0], masks[1]), "ChildTuning-F must draw a fresh mask each step"


CHECKS = {"childtuning-d": check_childtuning_d, "dps": check_dps, "childtuning-f": check_childtuning_f}


@pytest.mark.parametrize("strategy", sorted(CHECKS))
def test_rule_matches_oracle_single_process(strategy):
    CHECKS[strategy](_single(strategy))


def test_childtuning_f_is_reproducible_from_its_seed():
    first, second = _single("childtuning-f"), _single("childtuning-f")
    assert all(torch.equal(a, b) for a, b in zip(first.after, second.after))


def test_vanilla_is_plain_sgd_bit_for_bit():
    model, reference = tiny_bert(seed=0, dropout=0.0), tiny_bert(seed=0, dropout=0.0)
    bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=LR), BiDropConfig(strategy="vanilla"))
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for batch in _batches(0, 3, 0):
        assert bidrop.step(batch).kept_fraction == 1.0
        reference(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_childtuning_d_needs_its_fisher_mask_first():
    model = tiny_bert()
    bidrop = BiDrop(model, torch.optim.SGD(model.parameters(), lr=LR), _config("childtuning-d"))
    with pytest.raises(RuntimeError, match="estimate_fisher"):
        bidrop.step(random_batch(0))
    other = BiDrop(model, torch.optim.SGD(model.parameters(), lr=LR), _config("dps"))
    with pytest.raises(ValueError, match="only strategy 'childtuning-d'"):
        other.estimate_fisher([random_batch(0)])


def _sharded(rank: int, world_size: int, stages: list[int]) -> list[tuple[int, str, str]]:
    """Every rank records (the assembly gathers); each checks the whole-model oracle itself."""
    out = []
    for stage in stages:
        for strategy in sorted(CHECKS):
            engine = make_engine(stage, "fp32", chunks=1)
            recorded = _run(BiDrop(engine, config=_config(strategy)), strategy, rank)
            engine.destroy()
            try:
                CHECKS[strategy](recorded)
                verdict = "ok"
            except AssertionError as err:
                verdict = f"{err}"
            out.append((stage, strategy, verdict))
    return out


def test_rules_match_oracle_on_zero_shards():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ranks = run_distributed(_sharded, world_size=2, timeout_s=600, stages=[2, 3])
    expected = [(stage, strategy, "ok") for stage in (2, 3) for strategy in sorted(CHECKS)]
    assert ranks == [expected, expected]
