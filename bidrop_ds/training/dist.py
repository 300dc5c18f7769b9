"""Distributed start and stop for the recipes, and the few collectives they need.

Start: `init_distributed` (gloo on CPU, the accelerator's backend, nccl on CUDA, otherwise; a world of
one rank without a launcher; a bound on how long a collective waits). Stop: `close_process_group` after
a run, `abandon_distributed` after `lost_contact_message` recognised a lost peer. Loading:
`rank_zero_first` runs a block on rank 0 first and turns a mistake on any rank into the same
`LoadError` on every rank, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import math
import os
import re
import socket
import warnings
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from bidrop_ds.comm import close_process_group

__all__ = ["GLOO_FAILURE", "LoadError", "abandon_distributed", "close_process_group", "free_port", "gather_to_all",
           "init_distributed", "launched_world_size", "lost_contact_message", "mean", "mean_over_ranks",
           "rank_zero_first", "world"]

# gloo reports a vanished or silent peer as a plain RuntimeError ("Connection closed by peer",
# "Connection reset by peer", "Timed out waiting 5000ms for recv operation to complete").
GLOO_FAILURE = re.compile(r"Connection (closed|reset) by peer|Connection refused|Timed out waiting")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The world size the launcher announced (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port free on this host now (for a world of one rank started without a launcher)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(local_rank: int, timeout_s: float | None = None) -> None:
    """`deepspeed.init_distributed` with gloo on CPU, the accelerator's backend (nccl on CUDA) otherwise.
    Without a launcher (plain `python finetune.py --deepspeed ...`) this is a world of one rank.
    `timeout_s` bounds each collective (None: DeepSpeed's default), so a rank whose peers hang gives up."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # DeepSpeed still calls torch.distributed functions that torch deprecates; one warning per call site and rank
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    if timeout_s is None:
        deepspeed.init_distributed(dist_backend=backend)
        return
    timeout = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    # DeepSpeed makes its ZeRO groups with dist.new_group(ranks), which takes torch's default timeout
    # (30 min for gloo), not the world group's: make ours the default for the groups made from now on.
    from torch.distributed import distributed_c10d

    if not hasattr(distributed_c10d, "default_pg_timeout"):
        warnings.warn(f"--dist_timeout {timeout_s:g}: this torch {torch.__version__} has no "
                      "distributed_c10d.default_pg_timeout; DeepSpeed's ZeRO groups keep torch's default timeout")
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(distributed_c10d, name, None), timedelta):
            setattr(distributed_c10d, name, timeout)


def lost_contact_message(err: BaseException, program: str = "finetune.py") -> str | None:
    """The one-line report for an error that means this rank lost the other ranks (a peer died, hung
    past --dist_timeout, or the network failed: a torch.distributed error, or gloo's RuntimeError);
    None for any other error."""
    text = str(err)
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and GLOO_FAILURE.search(text))):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    # without gloo's "[.../pair.cc:553] " source location and its advice after the first sentence
    detail = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0].rstrip(".")[:300]
    rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
    return f"{program}: rank {rank} lost contact with the other ranks ({detail}): exiting"


def abandon_distributed() -> None:
    """After lost contact: destroy the process group without a barrier (the peers are gone), so
    that gloo's threads do not abort the exit ('terminate called without an active exception')."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order, on every rank ([value] in one process)."""
    _, size = world()
    if size == 1:
        return [value]
    out = [None] * size
    dist.all_gather_object(out, value)
    return out


def mean(values: list[float]) -> float:
    """The mean of `values`; NaN for none."""
    return sum(values) / len(values) if values else math.nan


def mean_over_ranks(values: list[float], device: torch.device | None) -> float:
    """The mean of every rank's `values` together (NaN if no rank has any); `device`: where the
    process group reduces."""
    _, size = world()
    if size == 1:
        return mean(values)
    total = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total[0].item() / total[1].item() if total[1].item() else math.nan


class LoadError(Exception):
    """A mistake found while loading the data or the tokenizer (a file, a column, a row, a hub id that
    cannot be reached), known to every rank alike: a recipe reports it as one line on rank 0 (naming
    the rank it happened on if not 0), and every rank exits."""

    def __init__(self, message: str, rank: int = 0) -> None:
        super().__init__(message if rank == 0 else f"rank {rank}: {message}")


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads, dataset caches), then the other ranks.

    An OSError or ValueError in the block becomes a LoadError on every rank: after each turn the
    ranks exchange its outcome (one small all-gather, which is also the wait), so a mistake on one
    rank never leaves the others waiting in a collective, and ranks whose turn comes after a failed
    one do not run the block at all."""
    rank, size = world()
    if size > 1 and rank != 0:
        _raise_first_failure(None)  # rank 0's turn
    failure = None
    try:
        yield
    except (OSError, ValueError) as err:
        failure = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line
    if rank == 0:
        _raise_first_failure(failure)  # rank 0's turn (one process: this raises its failure)
    if size > 1:
        _raise_first_failure(failure if rank != 0 else None)  # the other ranks' turn


def _raise_first_failure(failure: str | None) -> None:
    """Every rank contributes its failure message (or None); if any has one, raise LoadError with the
    lowest failing rank's on every rank."""
    for rank, message in enumerate(gather_to_all(failure)):
        if message is not None:
            raise LoadError(message, rank)
