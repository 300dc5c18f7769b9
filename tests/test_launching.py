"""tests/launching.py: a launcher that hangs is stopped with every process below it, even those in
sessions of their own (as torchrun starts its ranks)."""

from __future__ import annotations

import os
import subprocess
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
    left = subprocess.run(["pgrep", "-f", SLEEPER], capture_output=True, text=True).stdout
    assert left.strip() == "", f"processes left running: {left}"
