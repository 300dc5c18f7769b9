"""Run a launcher (torchrun, accelerate launch) as a subprocess for multi-rank end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first: torchrun starts each rank in a
    session of its own, so killing the launcher's group alone leaves the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def run_in_session(command: list[str], env: dict[str, str], timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run `command` in its own session, so that a hang is ended for the launcher and all its ranks
    alike: past `timeout` seconds they are stopped (SIGTERM, then SIGKILL) and the test fails with
    the output."""
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = [proc.pid, *descendants(proc.pid)]
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in tree:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    stdout, stderr = proc.communicate(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                stdout, stderr = proc.communicate()
            pytest.fail(f"{what} did not finish in {timeout} s\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
