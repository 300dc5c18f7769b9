"""scores_into_m2: the spec's element scores from the streaming statistics."""

from __future__ import annotations

import math

import pytest
import torch

from bidrop_ds.core import scores as scores_module
from bidrop_ds.core.scores import mask_update_, masked_mean_into_, pair_scores_, scores_into_m2
from bidrop_ds.core.stats import PassStatistics
from tests.oracle import oracle_step

KINDS = ["product", "perturbation", "scaling"]
N = 2000


def _case(name: str, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(passes, |theta|) of one named scenario, fp32.

    Elements are well conditioned (|m| and s are not tiny next to the passes), so the only error
    left is fp32 rounding of well-posed quantities and rel 1e-5 is a fair bound; elements where m or
    s is exactly zero are built exactly (g and -g, equal passes).
    """
    gen = torch.Generator().manual_seed(seed)

    def signal(scale):  # sign * U(0.5, 2) * scale
        sign = torch.randint(0, 2, (N,), generator=gen).float() * 2 - 1
        return sign * (0.5 + 1.5 * torch.rand(N, generator=gen)) * scale

    def passes_around(m, k, rel):  # alternating spread of rel * |m| * (1 .. 2) around m
        return [m * (1 + rel * (-1) ** j * (1 + torch.rand(N, generator=gen))) for j in range(k)]

    if name == "random":
        passes, theta = passes_around(signal(1.0), 3, 0.3), signal(1.0).abs()
    elif name == "zero_mean":  # m = 0 with s > 0 (g, -g), and m = s = 0 (all passes -0.0 or 0.0)
        g = signal(1.0)
        g[: N // 4] = -0.0
        g[N // 4: N // 2] = 0.0
        passes, theta = [g, -g], signal(1.0).abs()
    elif name == "equal_passes":  # s = 0 exactly: F_per = |m| / eps
        g = signal(1.0)
        passes, theta = [g.clone() for _ in range(4)], signal(1.0).abs()
    elif name == "theta_zero":  # F_sca = |m| / eps
        passes, theta = passes_around(signal(1.0), 2, 0.1), torch.zeros(N)
    elif name == "huge":  # |m| ~ 1e20, s ~ 1e18 (M2 ~ 1e37 still fits fp32), |theta| ~ 1e20
        passes, theta = passes_around(signal(1e20), 2, 0.01), signal(1e20).abs()
    elif name == "tiny":  # |m| ~ 1e-20 (M2 ~ 1e-42 is subnormal, dwarfed by eps), |theta| ~ 1e-20
        passes, theta = passes_around(signal(1e-20), 3, 0.3), signal(1e-20).abs()
    elif name == "mixed_scale":  # elements spanning 1e-12 .. 1e6 in one tensor, k = 5
        scale = 10.0 ** torch.randint(-12, 7, (N,), generator=gen).double()
        passes = [(p * scale).float() for p in passes_around(signal(1.0).double(), 5, 0.2)]
        theta = (signal(1.0).abs() * scale).float()
    else:
        raise KeyError(name)
    return [p.float() for p in passes], theta.float()


CASES = ["random", "zero_mean", "equal_passes", "theta_zero", "huge", "tiny", "mixed_scale"]


def _stats(passes: list[torch.Tensor]) -> PassStatistics:
    stats = PassStatistics(passes[0].numel())
    for grad in passes:
        stats.update(grad)
    return stats


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_oracle(kind, case):
    """Scores equal the oracle's float64 scores (rel 1e-5), are >= 0 with no sign bit (the selection
    rejects -0.0), are written into M2 in place, and leave the mean and |theta| untouched."""
    passes, theta = _case(case, seed=10 * KINDS.index(kind) + CASES.index(case))
    stats = _stats(passes)
    mean_before, theta_before = stats.mean.clone(), theta.clone()
    out = scores_into_m2(stats, theta, kind, eps=1e-8)
    assert out.data_ptr() == stats.m2.data_ptr() and out.dtype == torch.float32
    assert torch.equal(stats.mean, mean_before) and torch.equal(theta, theta_before)
    oracle = oracle_step(passes, theta, p=0.3, score=kind, eps=1e-8)
    torch.testing.assert_close(out.double(), oracle.scores, rtol=1e-5, atol=0)
    assert not out.signbit().any() and not out.isnan().any()


@pytest.mark.parametrize("kind", KINDS)
def test_scores_accept_low_precision_theta(kind):
    """|theta| may be bf16 / fp16 (the parameter's own dtype): same scores as its fp32 upcast."""
    passes, theta = _case("random", seed=7)
    for dtype in (torch.bfloat16, torch.float16):
        low = theta.to(dtype)
        ref = scores_into_m2(_stats(passes), low.float(), kind, eps=1e-8)
        assert torch.equal(scores_into_m2(_stats(passes), low, kind, eps=1e-8), ref)


# Hand-computed values on g = (3, 1) or (-3, -1): |m| = 2, population s = 1 (sample s = sqrt 2),
# |theta| = 1, eps = 0.5 (large, so its placement matters). Each row names the wrong formulas it
# rules out; e.g. perturbation with sample std = 2 / 1.914, with eps in the sqrt = 2 / sqrt(1.5),
# product as a sum = 8/3, signed m = negative scores, |m| / |theta| + eps = 2.5.
HAND = [
    ("perturbation", [3.0, 1.0], 1.0, 4 / 3),   # |m| / (s + eps), s population
    ("perturbation", [-3.0, -1.0], 1.0, 4 / 3),  # |m|, not m
    ("scaling", [3.0, 1.0], 1.0, 4 / 3),        # |m| / (|theta| + eps)
    ("scaling", [-3.0, -1.0], 0.0, 4.0),        # theta = 0: |m| / eps
    ("product", [3.0, 1.0], 1.0, 16 / 9),       # F_per * F_sca, not F_per + F_sca
    ("product", [-3.0, -1.0], 3.0, 4 / 3 * 4 / 7),
    ("perturbation", [2.0, 2.0], 1.0, 4.0),     # s = 0: |m| / eps, eps outside the sqrt
    ("perturbation", [5.0], 1.0, 10.0),         # k = 1: s = 0
    ("perturbation", [4.0, 0.0, 2.0], 1.0, 2 / ((8 / 3) ** 0.5 + 0.5)),  # k = 3: s^2 = 8/3 (1/k)
    ("product", [0.0, 0.0], 0.0, 0.0),          # m = 0 gives 0, not 0/0
]


@pytest.mark.parametrize("kind,grads,abs_theta,expected", HAND)
def test_hand_computed_formulas(kind, grads, abs_theta, expected):
    """Pins the exact formula (population std, |m|, eps placement, product of factors)."""
    stats = _stats([torch.tensor([g]) for g in grads])
    out = scores_into_m2(stats, torch.tensor([abs_theta]), kind, eps=0.5)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_random_scores_depend_on_the_seed_only():
    """"random": values in [0, 1), a function of the generator alone (not of the statistics, not of
    torch's global RNG); the mean is untouched."""
    global_seeds = iter(range(100, 200))

    def run(case, seed):
        stats = _stats(_case(case, seed=3)[0])
        mean = stats.mean.clone()
        torch.manual_seed(next(global_seeds))  # a different global RNG state on every call
        out = scores_into_m2(stats, torch.ones(N), "random", 1e-8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(stats.mean, mean) and out.data_ptr() == stats.m2.data_ptr()
        return out.clone()

    a = run("random", 1)
    assert (a >= 0).all() and (a < 1).all() and a.unique().numel() > N // 2
    assert torch.equal(a, run("huge", 1))
    assert not torch.equal(a, run("random", 2))


def test_errors():
    """No pass folded, or an unknown kind: ValueError."""
    with pytest.raises(ValueError, match="no pass"):
        scores_into_m2(PassStatistics(3), torch.ones(3), "product", 1e-8)
    with pytest.raises(ValueError, match="bogus"):
        scores_into_m2(_stats([torch.ones(3)]), torch.ones(3), "bogus", 1e-8)


@pytest.mark.parametrize("kind", ["product", "perturbation", "scaling"])
def test_no_intermediate_overflow(kind):
    """A score representable in fp32 must not come out inf through an overflowing intermediate.

    g = (1e20, 1e20): s = 0, |theta| = 1e20, eps = 1e-8, so F_per = 1e28, F_sca = 1, S = 1e28, all
    finite in fp32. Computing F_per * |m| first (1e48) before dividing by |theta| + eps overflows.
    """
    passes = [torch.full((4,), 1e20), torch.full((4,), 1e20)]
    theta = torch.full((4,), 1e20)
    out = scores_into_m2(_stats(passes), theta, kind, eps=1e-8)
    oracle = oracle_step(passes, theta, p=0.3, score=kind, eps=1e-8)
    torch.testing.assert_close(out.double(), oracle.scores, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["random", "equal_passes", "theta_zero"])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_scale_makes_scores_scale_free(kind, case):
    """Passes carrying a loss scale L, with grad_scale=L: F_per is unchanged (eps is added as eps*L,
    which matters most where s = 0) and product / scaling gain exactly the uniform factor L, so the
    mask cannot depend on L. Bit for bit for powers of two, rel 1e-6 for L = 3."""
    passes, theta = _case(case, seed=KINDS.index(kind))
    plain = scores_into_m2(_stats(passes), theta, kind, eps=1e-8).clone()
    factor = 1.0 if kind == "perturbation" else None
    for scale in (2.0 ** 16, 2.0 ** -7, 3.0):
        scaled = scores_into_m2(_stats([g * scale for g in passes]), theta, kind, eps=1e-8, grad_scale=scale)
        expected = plain * (factor or scale)
        if math.log2(scale).is_integer():
            assert torch.equal(scaled, expected), scale
        else:
            torch.testing.assert_close(scaled, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_pieces_and_signed_theta_give_the_same_scores(kind, monkeypatch):
    """The chunked loop (any chunk size, on CPU), |theta| as a list of pieces (views where the
    parameters live) and the signed theta all give exactly the scores of one flat |theta|."""
    passes, theta = _case("mixed_scale", seed=11)
    reference = scores_into_m2(_stats(passes), theta, kind, eps=1e-8).clone()
    signed = theta * torch.where(torch.arange(N) % 3 == 0, -1.0, 1.0)
    for chunk in (1, 7, 512, 1 << 20):
        monkeypatch.setitem(scores_module.CHUNK, "cpu", chunk)
        pieces = [signed[:5], signed[5:5], signed[5:1500].view(5, -1), signed[1500:]]
        for abs_param in (theta, signed, pieces, [p.to(torch.float64) for p in pieces]):
            got = scores_into_m2(_stats(passes), abs_param, kind, eps=1e-8)
            assert torch.equal(got, reference), (chunk, type(abs_param))


def test_theta_pieces_must_cover_the_statistics():
    """Pieces that do not add up to the statistics' length: ValueError naming both sizes."""
    with pytest.raises(ValueError, match="abs_param has 5 elements, the statistics 6"):
        scores_into_m2(_stats([torch.ones(6), torch.zeros(6)]), [torch.ones(2), torch.ones(3)], "product", 1e-8)


@pytest.mark.parametrize("chunk", [1, 5, 1 << 16])
def test_mask_update_matches_masked_fill(chunk, monkeypatch):
    """mask_update_ keeps update where score >= threshold and zeroes the rest (ties kept, +inf kept,
    negative scores dropped), exactly like masked_fill_ up to the sign of the written zeros."""
    monkeypatch.setitem(scores_module.CHUNK, "cpu", chunk)
    gen = torch.Generator().manual_seed(4)
    scores = torch.rand(1003, generator=gen)
    scores[::7] = 0.5
    scores[::11] = float("inf")
    scores[::13] = -1.0
    update = torch.randn(1003, generator=gen)
    expected = update.masked_fill(scores < 0.5, 0.0)
    got = mask_update_(update, scores.clone(), 0.5)
    assert got.data_ptr() == update.data_ptr()
    assert torch.equal(got, expected) and torch.equal(got.abs(), expected.abs())
    assert int((got != 0).sum()) == int((scores >= 0.5).sum())


def test_mask_update_shape_check():
    """update and scores must have the same shape and dtype."""
    with pytest.raises(ValueError, match="must match"):
        mask_update_(torch.zeros(3), torch.zeros(4), 0.0)


@pytest.mark.parametrize("kind", KINDS + ["random"])
def test_ineligible_ranges_score_minus_one(kind, monkeypatch):
    """`ineligible` ranges (overlapping, unsorted, empty) get -1 without being computed; every other
    element has exactly the score it gets without them (random: the same draws)."""
    monkeypatch.setitem(scores_module.CHUNK, "cpu", 100)
    passes, theta = _case("random", seed=5)
    ranges = [(1500, 2000), (10, 10), (0, 3), (200, 450), (400, 700)]
    generator = (lambda: torch.Generator().manual_seed(1)) if kind == "random" else (lambda: None)
    reference = scores_into_m2(_stats(passes), theta, kind, 1e-8, generator()).clone()
    got = scores_into_m2(_stats(passes), [theta[:1000], theta[1000:]], kind, 1e-8, generator(), ineligible=ranges)
    marked = torch.zeros(N, dtype=torch.bool)
    for start, end in ranges:
        marked[start:end] = True
    assert (got[marked] == -1.0).all() and torch.equal(got[~marked], reference[~marked])
    with pytest.raises(ValueError, match="outside"):
        scores_into_m2(_stats(passes), theta, kind, 1e-8, generator(), ineligible=[(5, N + 1)])


def _split(flat: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    """Views of `flat` cut at `cuts` (empty pieces included), as a backend's fragments are."""
    bounds = [0, *cuts, flat.numel()]
    return [flat[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("kind", [*KINDS, "random"])
def test_pair_sweep_over_a_held_first_pass_is_bit_identical(kind, monkeypatch):
    """Pass 1 held where it lives (`hold_first`, pieces cut elsewhere than pass 2's) gives the very
    scores and masked mean of pass 1 copied into the statistics' buffer, and allocates no buffer:
    the mean is written over pass 1's own views."""
    passes, theta = _case("mixed_scale", seed=5)
    for chunk in (7, 1 << 16):
        monkeypatch.setitem(scores_module.CHUNK, "cpu", chunk)
        results = []
        for held in (False, True):
            first, second = passes[0].clone(), passes[1].clone()
            stats = PassStatistics(N)
            if held:
                stats.hold_first(_split(first, [3, 3, 700]))
            else:
                stats.update(first)
            stats.hold_last(_split(second, [1000, 1999]))
            generator = torch.Generator().manual_seed(1)
            scores = pair_scores_(stats, theta, kind, eps=1e-8, generator=generator)
            written = torch.cat([s.clone() for s in scores])
            masked_mean_into_(scores, stats.mean_pieces(), threshold=float(written.median()), divisor=0.3)
            results.append((written, second.clone(), stats.nbytes))
            if held:
                assert torch.equal(first, passes[0] + (passes[1] - passes[0]) * 0.5)  # the mean, in place
        (scores_copied, update_copied, bytes_copied), (scores_held, update_held, bytes_held) = results
        assert torch.equal(scores_held, scores_copied) and torch.equal(update_held, update_copied), chunk
        assert (bytes_copied, bytes_held) == (4 * N, 0)


def test_a_held_first_pass_folds_like_a_copied_one():
    """A rule that folds (Welford) copies a held pass 1 into the statistics first: the same mean and
    M2 as folding it, pass 1's storage untouched; a non-finite held pass 1 is seen by is_finite."""
    passes, _ = _case("mixed_scale", seed=6)
    stats, reference = PassStatistics(N), _stats(passes[:2])
    first = passes[0].clone()
    stats.hold_first(_split(first, [10, 1500]))
    assert stats.is_finite() and stats.nbytes == 0
    stats.hold_last(passes[1].clone())
    stats.fold_last()
    assert torch.equal(stats.mean, reference.mean) and torch.equal(stats.m2, reference.m2)
    assert torch.equal(first, passes[0]) and stats.first is None
    poisoned = PassStatistics(N)
    first[1600] = float("nan")
    poisoned.hold_first(_split(first, [10, 1500]))
    assert not poisoned.is_finite()
    with pytest.raises(ValueError, match="1 passes already counted"):
        poisoned.hold_first(first)
