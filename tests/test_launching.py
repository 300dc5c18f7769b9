"""tests/launching.py: a launcher that hangs is stopped with every process below it, even those in
sessions of their own (as torchrun starts its ranks)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.launching import run_in_session

SLEEPER = "import time; time.sleep(321)"


def test_a_hang_ends_with_the_launcher_and_its_detached_children(tmp_path: Path) -> None:
    launcher = tmp_path / "launcher.py"
    launcher.write_text("import subprocess, sys, time\n"
                        f"subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], start_new_session=True)\n"
                        "time.sleep(321)\n")
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish in 3 s"):
        run_in_session([sys.executable, str(launcher)], dict(os.environ), 3, "the launcher")
    assert time.monotonic() - started < 60
    assert not running(SLEEPER), "the detached child was left running"


def running(command_part: str) -> list[int]:
    """The pids whose command line contains `command_part` (Linux /proc; no procps needed)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if command_part in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            continue
    return found
