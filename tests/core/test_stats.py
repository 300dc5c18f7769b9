"""PassStatistics (streaming Welford mean / M2) against the float64 oracle of the spec."""

from __future__ import annotations

import pytest
import torch

from bidrop_ds.core.stats import PassStatistics
from tests.oracle import oracle_step

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INF, NAN = float("inf"), float("nan")


def _passes(k: int, n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """k passes sharing a per-element signal (offset) plus per-pass noise, as dropout passes do."""
    gen = torch.Generator().manual_seed(seed)
    base = 3 * torch.randn(n, generator=gen)
    base[::17] = 0.0  # some elements with no signal at all
    return [(base + torch.randn(n, generator=gen)).to(dtype) for _ in range(k)]


def _fold(passes: list[torch.Tensor]) -> PassStatistics:
    stats = PassStatistics(passes[0].numel())
    for grad in passes:
        stats.update(grad)
    return stats


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", range(1, 9))
def test_mean_and_population_std_match_oracle(k, dtype):
    """mean and sqrt(M2/k) equal the oracle's float64 mean and population std (not 1/(k-1))."""
    passes = _passes(k, 3000, dtype, seed=100 * k + len(str(dtype)))
    stats = _fold(passes)
    oracle = oracle_step(passes, torch.ones(3000), p=0.3)
    assert stats.count == k
    assert stats.mean.dtype == stats.m2.dtype == torch.float32
    torch.testing.assert_close(stats.mean.double(), oracle.mean, rtol=1e-5, atol=1e-6)
    std = (stats.m2.double() / k).sqrt()
    torch.testing.assert_close(std, oracle.std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", range(2, 9))
@pytest.mark.parametrize("base,spread", [(1e4, 1.0), (1e3, 0.1), (1.0, 1e-3)])
def test_no_catastrophic_cancellation(base, spread, k):
    """Passes that nearly agree (spread / mean = 1e-4 .. 1e-3): Welford keeps the std within 1e-3
    relative, where the fp32 sum / sum-of-squares form is off by > 1 % (checked, so the case bites).

    (1e4 + 1e-3 noise is not usable: 1e-3 is one fp32 ulp of 1e4, below what any fp32 state holds.)
    """
    gen = torch.Generator().manual_seed(k)
    n = 4096
    passes = [torch.full((n,), base) + spread * (-1) ** j * (1 + 0.5 * torch.rand(n, generator=gen))
              for j in range(k)]
    exact = torch.stack(passes).double().std(0, correction=0)
    stats = _fold(passes)
    welford = (stats.m2.double() / k).sqrt()
    assert ((welford - exact).abs() / exact).max() <= 1e-3
    g = torch.stack(passes)
    naive = ((g * g).mean(0) - g.mean(0) ** 2).clamp_min(0).sqrt().double()
    assert ((naive - exact).abs() / exact).max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_pass_is_exact(dtype):
    """k = 1: mean is the input bit for bit (k = 1 must equal vanilla), M2 is zero, no aliasing."""
    grad = torch.tensor([1.1, -0.0, 3e-5, -7.25, 6e4, 1e-7]).to(dtype)
    stats = PassStatistics(grad.numel())
    stats.update(grad)
    expected = grad.float().clone()
    grad.fill_(5.0)  # the statistics must hold a copy, not a view of the caller's gradient
    assert torch.equal(stats.mean, expected)
    assert torch.equal(stats.mean.signbit(), expected.signbit())
    assert torch.equal(stats.m2, torch.zeros(6))
    assert stats.count == 1


@pytest.mark.parametrize("passes,finite", [
    ([[1.0, 2.0]], True),
    ([[1.0, 2.0], [3.0, -4.0], [6e4, -6e4]], True),
    ([[INF, 2.0]], False),
    ([[-INF, 2.0]], False),
    ([[NAN, 2.0]], False),
    ([[1.0, 2.0], [1.0, INF]], False),
    ([[1.0, 2.0], [-INF, 2.0]], False),
    ([[1.0, 2.0], [1.0, NAN]], False),
    ([[INF, 2.0], [-INF, 2.0]], False),
    ([[INF, 2.0], [INF, 2.0]], False),
    ([[1.0, 2.0], [NAN, 2.0], [1.0, 2.0]], False),
])
def test_is_finite(passes, finite):
    """is_finite is False as soon as any pass held inf, -inf or NaN (in any pass), True otherwise."""
    stats = _fold([torch.tensor(p) for p in passes])
    assert stats.is_finite() is finite


def test_is_finite_empty():
    """A rank owning no element is finite (no reduction over an empty buffer)."""
    assert PassStatistics(0).is_finite() is True


def test_reset_forgets_everything():
    """After reset, the next passes give exactly the statistics of a fresh object (count, M2 and the
    held pass forgotten; the buffers are overwritten by the next folds, not zeroed by reset)."""
    old, new = _passes(3, 500, torch.float32, 1), _passes(2, 500, torch.float32, 2)
    stats = _fold(old + [torch.full((500,), float("inf"))])
    stats.reset()
    assert stats.count == 0 and stats.last is None and stats.is_finite()
    for grad in new:
        stats.update(grad)
    fresh = _fold(new)
    assert stats.count == 2
    assert torch.equal(stats.mean, fresh.mean) and torch.equal(stats.m2, fresh.m2)


@pytest.mark.parametrize("shape", [(9,), (11,), (10, 1), (1, 10), ()])
def test_wrong_shape_raises(shape):
    """A gradient of another shape raises ValueError and leaves the state (count) untouched."""
    stats = PassStatistics(10)
    stats.update(torch.ones(10))
    with pytest.raises(ValueError, match="shape"):
        stats.update(torch.ones(shape))
    assert stats.count == 1 and torch.equal(stats.mean, torch.ones(10))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_list_of_pieces_equals_flat(k):
    """update() with a list of pieces (any shapes, mixed dtypes, an empty one, a non-contiguous one)
    gives bit for bit the statistics of the flat concatenation."""
    gen = torch.Generator().manual_seed(k)
    shapes, dtypes = [(3, 4), (0,), (5,), (2, 1, 3), (4, 3)], [torch.float32, torch.bfloat16, torch.float32,
                                                              torch.float16, torch.float32]
    total = sum(torch.Size(s).numel() for s in shapes)
    pieced, flat = PassStatistics(total), PassStatistics(total)
    for _ in range(k):
        pieces = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
        pieces[-1] = pieces[-1].t()  # non-contiguous view: read in its logical (row-major) order
        pieced.update(pieces)
        flat.update(torch.cat([p.float().reshape(-1) for p in pieces]))
    assert pieced.count == flat.count == k
    assert torch.equal(pieced.mean, flat.mean) and torch.equal(pieced.m2, flat.m2)


@pytest.mark.parametrize("pieces", [[(4,), (5,)], [(4,), (7,)], [(2, 2), (3, 3)], []])
def test_wrong_total_of_pieces_raises(pieces):
    """Pieces not adding up to the buffer length raise ValueError, state untouched."""
    stats = PassStatistics(10)
    with pytest.raises(ValueError):
        stats.update([torch.ones(s) for s in pieces])
    assert stats.count == 0 and not stats.mean.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_fold_is_bit_identical(dtype, monkeypatch):
    """On CPU, pieces longer than CHUNK are folded chunk by chunk; mean and M2 equal, bit for bit,
    those of the torch._foreach_* path (flat gradient, and a list mixing long and short pieces)."""
    from bidrop_ds.core import stats as stats_module

    passes = _passes(4, 3001, dtype, seed=9)
    monkeypatch.setitem(stats_module.CHUNK, "cpu", 10**9)
    reference = _fold(passes)
    for chunk in (1, 64, 1000):
        monkeypatch.setitem(stats_module.CHUNK, "cpu", chunk)
        for split in (None, [1, 2000, 999, 1]):
            stats = PassStatistics(3001)
            for grad in passes:
                stats.update(grad if split is None else list(grad.split(split)))
            assert torch.equal(stats.mean, reference.mean) and torch.equal(stats.m2, reference.m2), (chunk, split)
