"""Run a function on N real torch.distributed (gloo) processes on localhost and collect results.

One launch may run several scenarios (process start-up costs seconds). Teardown follows the field
notes: collect garbage, barrier, destroy the process group, so gloo threads never abort the exit.
A rank that fails or hangs fails the test with its traceback instead of blocking the suite.
"""

from __future__ import annotations

import gc
import os
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, results: Any,
            kwargs: dict[str, Any], collective_timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=collective_timeout_s))
    ok = False
    try:
        results.put((rank, True, fn(rank, world_size, **kwargs)))
        ok = True
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        gc.collect()
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, timeout_s: float = 300,
                    collective_timeout_s: float = 120, **kwargs: Any) -> list[Any]:
    """`fn(rank, world_size, **kwargs)` on each rank (fn must be importable: a module-level function).

    Returns the per-rank return values in rank order; raises with the failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, port, results, kwargs, collective_timeout_s))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    failures = []
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout_s)
            (outputs.__setitem__(rank, value) if ok else failures.append(f"rank {rank}:\n{value}"))
            if failures:
                break
    except queue.Empty:
        failures.append(f"timed out after {timeout_s} s waiting for ranks {sorted(set(range(world_size)) - set(outputs))}")
    finally:
        for proc in procs:
            proc.join(timeout=90 if not failures else 5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    if failures:
        raise AssertionError("distributed run failed\n" + "\n".join(failures))
    bad_exit = [(rank, proc.exitcode) for rank, proc in enumerate(procs) if proc.exitcode != 0]
    assert not bad_exit, f"ranks exited abnormally (rank, exit code): {bad_exit}"
    return [outputs[rank] for rank in range(world_size)]
