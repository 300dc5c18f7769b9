"""A rank that dies (SIGKILL) or hangs (SIGSTOP) in the middle of a Bi-Drop step on 2 real DeepSpeed
ranks (gloo, CPU): the other rank reports "lost contact" in one line and exits non-zero, within
--dist_timeout plus a margin, never hanging. The ranks are plain processes (no torchrun, whose agent
would kill the survivor itself), running finetune.main() with a tiny `run` (tests/launch/fault_worker.py)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.launch.conftest import ROOT

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("fault_worker.py")
DIST_TIMEOUT = 4.0
MARGIN = 10.0  # the survivor's exit after the error: process-group teardown and interpreter exit
START_LIMIT = 120.0  # start-up (imports, DeepSpeed's engine) until the fault, on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_fault(mode: str, tmp_path: Path) -> tuple[subprocess.Popen, str, float]:
    """Start both ranks; return the survivor (rank 0, exited), its stderr, and the seconds from the
    fault to its exit. Both processes are gone when this returns."""
    time_file = tmp_path / f"fault_{mode}"
    port = str(_free_port())
    argv = [sys.executable, str(WORKER), mode, str(time_file), "--deepspeed",
            str(ROOT / "ds_configs" / "zero2_fp32.json"), "--batch_size", "8", "--k", "2", "--seed", "0",
            "--dist_timeout", str(DIST_TIMEOUT)]
    procs, logs = [], [tmp_path / f"rank{rank}_{mode}.log" for rank in (0, 1)]
    for rank in (0, 1):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        with open(logs[rank], "w") as log:  # a file, not a pipe: a full pipe would block a rank
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                          start_new_session=True))
    survivor = procs[0]
    try:
        deadline = time.monotonic() + START_LIMIT
        while not time_file.exists() and survivor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert time_file.exists(), f"rank 1 never reached the fault:\n{_tails(procs, logs)}"
        deadline = time.monotonic() + DIST_TIMEOUT + MARGIN
        while survivor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        exited = time.time()
        assert survivor.poll() is not None, (f"rank 0 still running {DIST_TIMEOUT + MARGIN} s after rank 1's "
                                             f"fault ({mode}): it hangs\n{_tails(procs, logs)}")
        return survivor, logs[0].read_text(), exited - float(time_file.read_text())
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tails(procs: list[subprocess.Popen], logs: list[Path]) -> str:
    """Both ranks' stderr (ends), after stopping them."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return "\n".join(f"rank {rank}:\n{log.read_text()[-3000:]}" for rank, log in enumerate(logs))


MESSAGE = re.compile(r"^finetune\.py: rank 0 lost contact with the other ranks \((?P<detail>[^\n]+)\): exiting$",
                     re.MULTILINE)


@pytest.mark.parametrize("mode", ["kill", "stop"])
def test_survivor_exits_when_a_rank_dies_mid_step(mode: str, tmp_path: Path) -> None:
    survivor, stderr, seconds = run_fault(mode, tmp_path)
    print(f"{mode}: rank 0 exited {seconds:.2f} s after rank 1's fault (--dist_timeout {DIST_TIMEOUT})")
    assert survivor.returncode == 1, f"exit {survivor.returncode}\n{stderr[-3000:]}"
    found = MESSAGE.search(stderr)
    assert found, stderr[-3000:]
    assert "terminate called" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert seconds <= DIST_TIMEOUT + MARGIN, seconds
    if mode == "kill":  # the peer's sockets close: gloo notices at once (about 1-3 s here, exit included)
        assert re.search(r"Connection (closed|reset) by peer", found["detail"]), stderr[-2000:]
    else:  # a silent peer: only the timeout ends the wait
        assert f"Timed out waiting {int(DIST_TIMEOUT * 1000)}ms" in found["detail"], stderr[-2000:]
        assert seconds >= DIST_TIMEOUT - 0.5, seconds


def test_dist_timeout_flag(finetune: ModuleType) -> None:
    assert finetune.parse_args(["--dist_timeout", "2.5"]).dist_timeout == 2.5
    assert finetune.parse_args([]).dist_timeout is None
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--dist_timeout", bad])
