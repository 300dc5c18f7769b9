"""The exact global threshold (radix select) and kept_count against a float64 sort, on one
process and on two real gloo ranks holding uneven pieces of the scores."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from bidrop_ds.comm import ProcessGroupCommunicator, default_communicator
from bidrop_ds.core import PassStatistics, scores_into_m2
from bidrop_ds.core import select
from bidrop_ds.core.select import LocalCommunicator, Threshold, global_threshold, group_thresholds, kept_count
from tests.distributed import run_distributed
from tests.oracle import assert_mask_matches, oracle_step

INF = float("inf")


def _reference(scores: torch.Tensor, n: int) -> tuple[float, int]:
    """The oracle's tau (n-th largest, float64 sort of the fp32 scores) and how many are >= tau.

    Scores with the sign bit set (-1 padding, ineligible elements) are not candidates."""
    candidates = scores[~scores.signbit()].double()
    tau = torch.sort(candidates, descending=True).values[n - 1].item()
    return tau, int((candidates >= tau).sum())


# Selection settings that exercise every path: (first-pass bits, chunk, compaction divisor).
# "cpu" is the CPU default; "cuda_plan" the plan used on other devices (9 bits first); "no_gather"
# forces the later rounds to re-read all scores; "tiny_chunks" splits every pass into many chunks.
SETTINGS = {
    "cpu": (15, 1 << 18, 4),
    "cuda_plan": (9, 1 << 18, 4),
    "wide_first": (12, 1 << 18, 4),
    "no_gather": (15, 1 << 18, 10**12),
    "tiny_chunks": (15, 7, 4),
    "tiny_chunks_no_gather": (9, 13, 10**12),
    "small_chunks": (15, 4099, 4),
    "small_chunks_no_gather": (9, 4097, 10**12),
}
SMALL_INPUT_SETTINGS = ["cpu", "cuda_plan", "wide_first", "no_gather", "tiny_chunks", "tiny_chunks_no_gather"]
LARGE_INPUT_SETTINGS = ["cpu", "cuda_plan", "wide_first", "no_gather", "small_chunks", "small_chunks_no_gather"]


def use_settings(name: str) -> None:
    """Set the selection's per-device knobs for CPU tensors (tests only)."""
    first, chunk, divisor = SETTINGS[name]
    select.FIRST_BITS["cpu"], select.CHUNK["cpu"], select.COMPACT_DIVISOR = first, chunk, divisor


@pytest.fixture
def settings(request):
    """The selection path named by the test's parameter; the defaults are restored afterwards."""
    saved = (select.FIRST_BITS["cpu"], select.CHUNK["cpu"], select.COMPACT_DIVISOR)
    use_settings(request.param)
    yield request.param
    select.FIRST_BITS["cpu"], select.CHUNK["cpu"], select.COMPACT_DIVISOR = saved


def expected_calls(first: int = 15) -> list[tuple[int, str]]:
    """The four all-reduces: 512 bins + flag, then the remaining bit fields (int64 counts)."""
    return [(513, "torch.int64")] + [(1 << width, "torch.int64") for width in select._plan(first)[1:]]


class CountingCommunicator:
    """Wraps a communicator and records (numel, dtype) of every all-reduce."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self.calls.append((tensor.numel(), str(tensor.dtype)))
        self.inner.all_reduce_sum(tensor)


# ------------------------------------------------------------------------------ kept_count

@pytest.mark.parametrize("p,total,n", [
    (0.1, 10, 1), (0.3, 10, 3), (0.7, 10, 7), (0.07, 100, 7), (0.57, 100, 57), (0.5, 7, 4),
    (0.3, 1, 1), (1e-9, 10, 1), (1e-9, 100003, 1), (1 - 1e-9, 10, 10), (1 - 1e-9, 100003, 100003),
    (1.0, 10, 10), (1, 7, 7), (0.3, 0, 0), (0.25, 1009, 253),
])
def test_kept_count_table(p, total, n):
    """n = max(1, ceil(p * N)) with p as written: 0.07 * 100 is 7 (float math says 7.000000000000001 -> 8)."""
    assert kept_count(p, total) == n


def test_kept_count_matches_oracle_rule():
    """kept_count agrees with the oracle's max(1, ceil(Fraction(str(p)) * N)) on 2000 random (p, N)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        digits = int(torch.randint(1, 6, (1,), generator=gen))
        p = round(float(torch.rand(1, generator=gen)), digits) or 1.0
        total = int(torch.randint(1, 10 ** int(torch.randint(1, 7, (1,), generator=gen)), (1,), generator=gen))
        assert kept_count(p, total) == max(1, math.ceil(Fraction(str(p)) * total)), (p, total)


# ------------------------------------------------------------------ single-process selection

def _scores(kind: str, numel: int, gen: torch.Generator) -> torch.Tensor:
    """Non-negative fp32 scores of one distribution (ties, zeros, inf, subnormals, huge, ...)."""
    if kind == "normal":
        return torch.randn(numel, generator=gen).abs()
    if kind == "ties":  # a handful of values, each repeated many times
        levels = torch.tensor([0.0, 1e-30, 0.5, 1.0, 1.0000001, 3e38])
        return levels[torch.randint(0, len(levels), (numel,), generator=gen)]
    if kind == "all_equal":
        return torch.full((numel,), 0.3)
    if kind == "zeros":
        out = torch.randn(numel, generator=gen).abs()
        return out * (torch.rand(numel, generator=gen) < 0.1)
    if kind == "with_inf":
        out = torch.randn(numel, generator=gen).abs()
        out[torch.rand(numel, generator=gen) < 0.2] = INF
        return out
    if kind == "bits":  # uniform over all non-negative finite fp32 bit patterns, plus +inf
        bits = torch.randint(0, 0x7F800001, (numel,), generator=gen, dtype=torch.int32)
        return bits.view(torch.float32)
    if kind == "subnormal":  # 0, subnormals and the smallest normals
        bits = torch.randint(0, 0x00800010, (numel,), generator=gen, dtype=torch.int32)
        return bits.view(torch.float32)
    if kind == "wide":  # 1e-45 .. 1e38 log-uniform
        return (10.0 ** (torch.rand(numel, generator=gen, dtype=torch.float64) * 83 - 45)).float()
    raise KeyError(kind)


KINDS = ["normal", "ties", "all_equal", "zeros", "with_inf", "bits", "subnormal", "wide"]


def _random_case(seed: int) -> tuple[torch.Tensor, int]:
    """Scores of one kind and size, every third case with -1 / -0.0 / -inf padding interleaved."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 7, 1009, int(torch.randint(1, 3000, (1,), generator=gen))]
    numel = sizes[seed % len(sizes)]
    scores = _scores(KINDS[(seed // len(sizes)) % len(KINDS)], numel, gen)
    if seed % 3 == 0:
        pad = torch.tensor([-1.0, -0.0, -INF, -1e-45])[torch.randint(0, 4, (numel // 2 + 1,), generator=gen)]
        scores = torch.cat([scores, pad])[torch.randperm(numel + len(pad), generator=gen)]
    choice = seed % 7
    n = [1, numel, kept_count(1e-9, numel), kept_count(1 - 1e-9, numel), kept_count(0.3, numel),
         kept_count(float(torch.rand(1, generator=gen)) or 1.0, numel),
         int(torch.randint(1, numel + 1, (1,), generator=gen))][choice]
    return scores, n


@pytest.mark.parametrize("settings", SMALL_INPUT_SETTINGS, indirect=True)
def test_threshold_matches_sort_property(settings):
    """Over 240 seeded cases (all score kinds x sizes x n, some with negative padding), tau and kept
    equal the float64 sort's over the non-negative scores, with every selection path (settings)."""
    for seed in range(240):
        scores, n = _random_case(seed)
        got = global_threshold(scores, n, LocalCommunicator())
        tau, kept = _reference(scores, n)
        assert isinstance(got, Threshold), seed
        assert (got.value, got.kept) == (tau, kept), (seed, scores.numel(), n)


@pytest.mark.parametrize("settings", LARGE_INPUT_SETTINGS, indirect=True)
@pytest.mark.parametrize("kind", KINDS)
def test_threshold_large(kind, settings):
    """N = 100003 (prime) for each kind, n in {1, 30001, N}: exact, with every selection path."""
    gen = torch.Generator().manual_seed(KINDS.index(kind))
    scores = _scores(kind, 100003, gen)
    for n in (1, kept_count(0.3, 100003), 100003):
        got = global_threshold(scores, n, LocalCommunicator())
        assert (got.value, got.kept) == _reference(scores, n), n


@pytest.mark.parametrize("scores,n,tau,kept", [
    ([2.0, 2.0, 2.0, 1.0], 1, 2.0, 3),            # ties at tau all kept
    ([2.0, 2.0, 2.0, 1.0], 4, 1.0, 4),
    ([0.0, 0.0, 0.0], 2, 0.0, 3),                 # all zero
    ([INF, 1.0, INF, 0.0], 1, INF, 2),            # +inf scores
    ([INF, 1.0, INF, 0.0], 3, 1.0, 3),
    ([1e-45, 0.0, 3e-45, 1.17e-38], 2, 3e-45, 2),  # subnormals (bits 1, 2) order like values
    ([3.4e38, 1e-45, 3.3e38], 2, 3.3e38, 2),
    ([5.0], 1, 5.0, 1),
])
def test_threshold_hand_cases(scores, n, tau, kept):
    """Small hand-checked cases: ties kept, zeros, inf, subnormals, extremes."""
    t = torch.tensor(scores, dtype=torch.float32)
    got = global_threshold(t, n, LocalCommunicator())
    assert got == Threshold(value=torch.tensor(tau, dtype=torch.float32).item(), kept=kept)


def test_end_to_end_mask_matches_oracle():
    """passes -> statistics -> scores -> global_threshold(kept_count(p, N)) gives the oracle's n and,
    up to fp32-borderline elements, the oracle's mask (ties at tau kept)."""
    gen = torch.Generator().manual_seed(5)
    numel = 5000
    passes = [torch.randn(numel, generator=gen) + torch.randn(numel, generator=gen).sign() for _ in range(3)]
    theta = torch.randn(numel, generator=gen).abs()
    for kind in ("product", "perturbation", "scaling"):
        for p in (1e-9, 0.1, 0.3, 0.77):
            oracle = oracle_step(passes, theta, p=p, score=kind)
            stats = PassStatistics(numel)
            for grad in passes:
                stats.update(grad)
            scores = scores_into_m2(stats, theta, kind, eps=1e-8)
            n = kept_count(p, numel)
            assert n == oracle.n
            got = global_threshold(scores, n, LocalCommunicator())
            mask = scores >= got.value
            assert int(mask.sum()) == got.kept >= n
            assert_mask_matches(mask, oracle)


def test_nonfinite_flag_returns_none():
    """locally_nonfinite: None (skip the step), after exactly one all-reduce."""
    comm = CountingCommunicator(LocalCommunicator())
    assert global_threshold(torch.rand(100), 10, comm, locally_nonfinite=True) is None
    assert comm.calls == [(513, "torch.int64")]


@pytest.mark.parametrize("first", [9, 15])
def test_communication_volume(first, monkeypatch):
    """Exactly 4 all-reduces of int64 counts, none over 8 KiB: 513 (512 bins + flag), then the
    remaining bit fields: 64, 256, 256 with the CPU's 15-bit first pass; 256, 128, 128 with 9."""
    monkeypatch.setitem(select.FIRST_BITS, "cpu", first)
    comm = CountingCommunicator(LocalCommunicator())
    global_threshold(torch.rand(10000), 3000, comm)
    assert comm.calls == expected_calls(first)
    assert comm.calls == ([(513, "torch.int64"), (64, "torch.int64"), (256, "torch.int64"), (256, "torch.int64")]
                          if first == 15 else
                          [(513, "torch.int64"), (256, "torch.int64"), (128, "torch.int64"), (128, "torch.int64")])
    assert all(numel * 8 <= 8192 for numel, _ in comm.calls)


@pytest.mark.parametrize("first", [8, 10, 20])
def test_plans_outside_the_budget_are_refused(first):
    """A first-pass width whose rounds would not cover 31 bits in 4 all-reduces of <= 1024 counts."""
    with pytest.raises(ValueError, match="first-pass width"):
        select._plan(first)


def test_nan_patterns_sort_above_inf_and_int32_max_is_handled():
    """Positive NaN bit patterns (never produced by finite statistics) rank above +inf, as their
    integers do, up to 0x7FFFFFFF, the largest pattern, whose range ends at INT32_MAX."""
    bits = torch.tensor([0x7FFFFFFF, 0x7FFFFFFF, 0x7FC00000, 0x7F800000, 0x3F800000, 0], dtype=torch.int32)
    scores = bits.view(torch.float32)
    for n, pattern, kept in [(1, 0x7FFFFFFF, 2), (2, 0x7FFFFFFF, 2), (3, 0x7FC00000, 3), (4, 0x7F800000, 4),
                             (6, 0, 6)]:
        got = global_threshold(scores, n, LocalCommunicator())
        assert torch.tensor([got.value]).view(torch.int32).item() == pattern and got.kept == kept, n


@pytest.mark.parametrize("settings", ["cpu", "no_gather", "tiny_chunks"], indirect=True)
def test_scores_are_only_read(settings):
    """The selection leaves its input untouched (the caller masks with it afterwards)."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.cat([_scores("wide", 5000, gen), torch.full((100,), -1.0)])
    before = scores.clone()
    global_threshold(scores, 1500, LocalCommunicator())
    assert torch.equal(scores.view(torch.int32), before.view(torch.int32))


@pytest.mark.parametrize("scores,n,tau,kept", [
    ([1.0, -1.0, 2.0, -1.0], 2, 1.0, 2),
    ([-INF, 0.0, -1e-45, 5.0], 2, 0.0, 2),     # 0.0 is a candidate, -1e-45 and -inf are not
    ([-0.0, 0.0, 3.0], 2, 0.0, 2),             # -0.0 (sign bit) is not a candidate either
    ([-1.0, -1.0, 7.0], 1, 7.0, 1),
])
def test_negative_scores_are_not_candidates(scores, n, tau, kept):
    """Scores with the sign bit set (padding, ineligible) are neither counted in N nor kept."""
    got = global_threshold(torch.tensor(scores, dtype=torch.float32), n, LocalCommunicator())
    assert got == Threshold(value=tau, kept=kept)


@pytest.mark.parametrize("scores,n", [
    ([1.0, 2.0], 0), ([1.0, 2.0], 3), ([1.0, 2.0], -1), ([], 1),
    ([1.0, -1.0, 2.0], 3),                     # N counts candidates only (2)
    ([-1.0, -INF], 1),                         # no candidate at all
])
def test_n_outside_1_to_N_raises(scores, n):
    """n outside 1..N (N = number of non-negative scores) raises ValueError."""
    with pytest.raises(ValueError, match="outside 1..N"):
        global_threshold(torch.tensor(scores, dtype=torch.float32), n, LocalCommunicator())


def test_non_float32_scores_raise():
    """Only float32 scores can be radix-selected on their bits."""
    with pytest.raises(TypeError):
        global_threshold(torch.rand(5, dtype=torch.float64), 1, LocalCommunicator())


# ------------------------------------------------------------- per-group (per-tensor) selection

def _split(scores: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    """The scores as 1-3 consecutive pieces (views), some possibly empty."""
    cuts = sorted(torch.randint(0, scores.numel() + 1, (int(torch.randint(0, 3, (1,), generator=gen)),),
                                generator=gen).tolist())
    bounds = [0, *cuts, scores.numel()]
    return [scores[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("settings", ["cpu", "no_gather", "tiny_chunks", "tiny_chunks_no_gather"], indirect=True)
def test_group_thresholds_equal_each_groups_own_sort(settings):
    """Groups of every score kind and size (some in several pieces, with negative padding): each
    group's threshold and kept count equal the float64 sort of that group alone."""
    gen = torch.Generator().manual_seed(7)
    for start in range(0, 120, 6):
        cases = [_random_case(seed) for seed in range(start, start + 6)]
        groups = [_split(scores, gen) for scores, _ in cases]
        got = group_thresholds(groups, [n for _, n in cases], LocalCommunicator())
        assert [(t.value, t.kept) for t in got] == [_reference(scores, n) for scores, n in cases], start


def test_group_thresholds_of_one_group_is_the_global_threshold():
    """One group: the same threshold and the same four all-reduces as global_threshold."""
    scores = _scores("wide", 5000, torch.Generator().manual_seed(1))
    calls = []
    for select_fn in (lambda c: global_threshold(scores, 1500, c),
                      lambda c: group_thresholds([[scores[:2000], scores[2000:]]], [1500], c)[0]):
        comm = CountingCommunicator(LocalCommunicator())
        calls.append((select_fn(comm), comm.calls))
    assert calls[0] == calls[1] and calls[0][1] == expected_calls()


def test_group_thresholds_share_the_four_all_reduces():
    """G groups: still 4 all-reduces, each the G groups' histograms side by side (first pass of 9 bits)."""
    gen = torch.Generator().manual_seed(2)
    groups = [[torch.rand(size, generator=gen)] for size in (10, 1000, 1)]
    comm = CountingCommunicator(LocalCommunicator())
    group_thresholds(groups, [3, 300, 1], comm)
    assert comm.calls == [(3 * 512 + 1, "torch.int64")] + [(3 << width, "torch.int64") for width in select._plan(9)[1:]]
    comm = CountingCommunicator(LocalCommunicator())
    assert group_thresholds(groups, [3, 300, 1], comm, locally_nonfinite=True) is None
    assert comm.calls == [(3 * 512 + 1, "torch.int64")]


@pytest.mark.parametrize("groups,ns,match", [
    ([[torch.rand(4)], [torch.rand(2)]], [1, 3], r"outside 1..N = 2 \(group 1\)"),
    ([[torch.rand(4)]], [1, 1], "2 counts n"),
    ([], [], "at least one"),
])
def test_group_thresholds_refuse_bad_counts(groups, ns, match):
    with pytest.raises(ValueError, match=match):
        group_thresholds(groups, ns, LocalCommunicator())


# ------------------------------------------------------------------- two real gloo ranks

def _dist_scenarios() -> list[tuple[str, torch.Tensor, int, list[int]]]:
    """(name, global scores, rank 0's share, n values): uneven pieces, one rank empty, ties, inf."""
    gen = torch.Generator().manual_seed(2024)
    return [
        ("normal_rank0_empty", _scores("normal", 1009, gen), 0, [1, 5, 303, 1009]),
        ("normal_rank1_empty", _scores("normal", 1009, gen), 1009, [1, 504, 1009]),
        ("ties", _scores("ties", 777, gen), 500, [1, 100, 400, 776, 777]),
        ("all_equal", _scores("all_equal", 50, gen), 49, [1, 25, 50]),
        ("zeros", _scores("zeros", 2000, gen), 3, [1, 150, 1999]),
        ("inf_on_rank1", torch.cat([torch.rand(300, generator=gen), torch.full((20,), INF)]), 300, [1, 20, 21, 320]),
        ("bits", _scores("bits", 4001, gen), 1234, [1, kept_count(0.3, 4001), 4001]),
        ("subnormal", _scores("subnormal", 999, gen), 998, [1, 300, 999]),
        ("padding_on_rank1", torch.cat([torch.rand(40, generator=gen), torch.full((60,), -1.0)]), 40, [1, 20, 40]),
    ]


DIST_SETTINGS = ["cpu", "cuda_plan", "tiny_chunks_no_gather"]


def _dist_worker(rank: int, world_size: int) -> dict:
    """Runs every scenario on this rank's piece, under each of DIST_SETTINGS; returns plain Python
    results (the default settings are restored for the checks after)."""
    out: dict = {"selection": [], "groups": [], "errors": {}}
    comm = ProcessGroupCommunicator()
    for setting in DIST_SETTINGS:
        use_settings(setting)
        for name, scores, share, ns in _dist_scenarios():
            local = scores[:share] if rank == 0 else scores[share:]
            for n in ns:
                counting = CountingCommunicator(comm)
                got = global_threshold(local.clone(), n, counting)
                out["selection"].append((setting, name, n, got.value, got.kept, counting.calls))
        groups = [[scores[:share] if rank == 0 else scores[share:]] for _, scores, share, _ in _dist_scenarios()]
        counting = CountingCommunicator(comm)
        got = group_thresholds(groups, [ns[len(ns) // 2] for *_, ns in _dist_scenarios()], counting)
        out["groups"].append((setting, [(t.value, t.kept) for t in got], counting.calls))
    use_settings("cpu")
    for flag_rank in (0, 1):
        counting = CountingCommunicator(comm)
        out[f"none_flag_on_{flag_rank}"] = (
            global_threshold(torch.rand(10), 3, counting, locally_nonfinite=rank == flag_rank), counting.calls)
    for label, local, n in [("n_too_large", torch.ones(3 + rank), 8),
                            ("n_over_candidates", torch.tensor([1.0, -1.0, -1.0, 1.0]) if rank else torch.ones(3),
                             6)]:
        try:
            global_threshold(local, n, comm)
            out["errors"][label] = "no error"
        except ValueError as err:
            out["errors"][label] = f"ValueError: {err}"
    summed = torch.tensor([rank + 1.0, 10.0 * rank])
    default = default_communicator()
    default.all_reduce_sum(summed)
    out["comm"] = (type(default).__name__, summed.tolist())
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """One 2-process gloo launch for all the distributed checks below."""
    return run_distributed(_dist_worker, world_size=2)


def test_two_ranks_equal_single_process_and_oracle(two_ranks):
    """Each rank's threshold over uneven pieces (one possibly empty) equals the single-process one
    and the float64 sort, on both ranks, with every selection path, in exactly 4 all-reduces
    (513 int64, then the plan's bit fields)."""
    results = iter(zip(*(r["selection"] for r in two_ranks)))
    for setting in DIST_SETTINGS:
        calls = expected_calls(SETTINGS[setting][0])
        for name, scores, _share, ns in _dist_scenarios():
            for n in ns:
                r0, r1 = next(results)
                assert r0[:3] == r1[:3] == (setting, name, n)
                single = global_threshold(scores, n, LocalCommunicator())
                assert (r0[3], r0[4]) == (r1[3], r1[4]) == (single.value, single.kept) == _reference(scores, n), \
                    (setting, name, n)
                assert r0[5] == r1[5] == calls, (setting, name, n)


def test_two_ranks_group_thresholds_equal_each_groups_sort(two_ranks):
    """Every scenario as one group of a single per-group selection (groups spanning both ranks,
    empty on one): each group's threshold is that group's float64 sort, on both ranks, in 4 all-reduces."""
    scenarios = _dist_scenarios()
    expected = [_reference(scores, ns[len(ns) // 2]) for _, scores, _, ns in scenarios]
    calls = [(len(scenarios) * 512 + 1, "torch.int64")] + [(len(scenarios) << w, "torch.int64")
                                                            for w in select._plan(9)[1:]]
    for result in two_ranks:
        assert [row[0] for row in result["groups"]] == DIST_SETTINGS
        for setting, got, got_calls in result["groups"]:
            assert [tuple(t) for t in got] == expected and got_calls == calls, setting


def test_two_ranks_nonfinite_flag_on_one_rank(two_ranks):
    """The flag raised on one rank only makes both ranks return None, after one all-reduce."""
    for flag_rank in (0, 1):
        for result in two_ranks:
            assert result[f"none_flag_on_{flag_rank}"] == (None, [(513, "torch.int64")])


def test_two_ranks_errors_are_collective(two_ranks):
    """n > global N (candidates only: -1 padding on one rank is not counted) raises ValueError on
    every rank (no hang, no rank left waiting in a later all-reduce)."""
    for label, text in [("n_too_large", "N = 7"), ("n_over_candidates", "N = 5")]:
        for result in two_ranks:
            assert result["errors"][label].startswith("ValueError") and text in result["errors"][label], label


def test_two_ranks_process_group_communicator_sums(two_ranks):
    """Inside a process group default_communicator() is a ProcessGroupCommunicator that sums."""
    for result in two_ranks:
        assert result["comm"] == ("ProcessGroupCommunicator", [3.0, 10.0])
