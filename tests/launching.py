"""Run a launcher (torchrun, accelerate launch) as a subprocess for multi-rank end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_session(command: list[str], env: dict[str, str], timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run `command` in its own session, so that a hang is ended for the launcher and all its ranks
    alike: past `timeout` seconds the whole group is killed and the test fails with the output."""
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{what} did not finish in {timeout} s\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
