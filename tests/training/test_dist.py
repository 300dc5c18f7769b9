"""bidrop_ds.training.dist: which errors mean lost contact (and their one-line report), loading on
rank 0 first with a mistake on any rank stopping every rank, and the small collectives in one process."""

from __future__ import annotations

import math

import torch.distributed as dist

from bidrop_ds.training.dist import (LoadError, gather_to_all, launched_world_size, lost_contact_message, mean,
                                     mean_over_ranks, rank_zero_first, world)
from tests.distributed import run_distributed


def test_lost_contact_message() -> None:
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:18116. This is typically caused by a remote worker crashing. GLHF!")
    assert lost_contact_message(gloo) == (
        "finetune.py: rank ? lost contact with the other ranks (Connection closed by peer [127.0.0.1]:18116): exiting")
    nccl = dist.DistBackendError("NCCL communicator was aborted on rank 1.\nmore")
    assert "(NCCL communicator was aborted on rank 1): exiting" in lost_contact_message(nccl, "soak.py")
    assert lost_contact_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    # a collective mismatch between ranks: a bug, not lost contact
    desync = RuntimeError("[enforce fail at /pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:446] "
                          "op.preamble.length <= op.nbytes. 96 vs 64")
    assert lost_contact_message(desync) is None
    assert lost_contact_message(ValueError("Timed out waiting")) is None


def test_one_process_collectives_are_the_local_values(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world() == (0, 1) and launched_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_world_size() == 4
    assert gather_to_all({"a": 1}) == [{"a": 1}]
    assert mean_over_ranks([1.0, 2.0, 6.0], None) == 3.0 and math.isnan(mean_over_ranks([], None))
    assert mean([]) != mean([])  # NaN


def _on_two_ranks(rank: int, world_size: int) -> tuple[list[tuple[bool, str | None]], tuple]:
    """One launch for both checks: (the loading turns, the collectives)."""
    return _load_turns(rank), _collectives(rank)


def _collectives(rank: int) -> tuple:
    """Rank 0 holds [1, 2], rank 1 [6]: the mean over all three values (3), not of the ranks' means (3.75);
    no values anywhere: NaN; and every rank's value on every rank."""
    return (world(), mean_over_ranks([[1.0, 2.0], [6.0]][rank], None), math.isnan(mean_over_ranks([], None)),
            gather_to_all(rank * 10))


def _load_turns(rank: int) -> list[tuple[bool, str | None]]:
    """On each rank, per scenario (nobody fails, rank 1 fails, rank 0 fails): (whether this rank ran the
    block, the LoadError message it stopped with, or None)."""
    outcomes = []
    for failing in (None, 1, 0):
        ran, message = False, None
        try:
            with rank_zero_first():
                ran = True
                if rank == failing:
                    raise FileNotFoundError(f"data.csv missing on rank {rank}")
        except LoadError as err:
            message = str(err)
        outcomes.append((ran, message))
    return outcomes


def test_a_loading_mistake_on_any_rank_stops_every_rank_and_the_collectives() -> None:
    """2 gloo ranks: a mistake in rank 1's turn reaches rank 0 (which had finished), one in rank 0's turn
    stops rank 1 before it runs the block; nobody waits in a collective (the launch would time out)."""
    (rank0, sums0), (rank1, sums1) = run_distributed(_on_two_ranks, world_size=2, timeout_s=240,
                                                     collective_timeout_s=60)
    assert sums0 == ((0, 2), 3.0, True, [0, 10]) and sums1 == ((1, 2), 3.0, True, [0, 10])
    assert rank0[0] == rank1[0] == (True, None)
    assert rank0[1] == rank1[1] == (True, "rank 1: data.csv missing on rank 1")
    assert rank0[2] == (True, "data.csv missing on rank 0") and rank1[2] == (False, "data.csv missing on rank 0")
