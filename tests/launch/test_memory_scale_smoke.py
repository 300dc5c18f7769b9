"""benchmarks/memory_scale.py at a tiny size (the >= 300M-parameter runs are benchmarks, run by hand):
its 2-rank jobs under ZeRO-2 and ZeRO-3 + offload (all four in one launch: --one_launch), the bytes per
element it reads off the tensors, and the projection table, so that its arguments and readings do not
rot between runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.launch.conftest import ROOT
from tests.launching import run_in_session

pytest.importorskip("deepspeed")


def test_tiny_memory_scale_reads_each_part_and_projects(tmp_path: Path) -> None:
    out = tmp_path / "memory_scale.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "memory_scale.py"), "--layers", "2", "--hidden", "64",
               "--intermediate", "128", "--heads", "2", "--vocab", "256", "--steps", "1",
               "--setups", "zero2", "zero3+offload", "--one_launch", "--timeout", "400", "--output_json", str(out)]
    done = run_in_session(command, dict(os.environ), timeout=600, what="memory_scale.py")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.count("running ...") == 1, done.stdout  # one torchrun job for the four measurements
    measured = json.loads(out.read_text())["bytes_per_element"]
    for setup in ("zero2", "zero3+offload"):
        b = measured[setup]
        # bf16 parameters; fp32 masters and Adam's two fp32 moments over the ranks; Bi-Drop keeps pass 1
        # of the eligible elements in fp32 (k = 2, fp32 accumulation)
        assert (b["param"], b["master"], b["optimizer"], b["bidrop_per_eligible"]) == (2.0, 4.0, 8.0, 4.0), setup
    rows = json.loads(out.read_text())["results"]
    assert {row["statistics_device"] for row in rows["zero3+offload/bidrop"]} == {"cpu"}
    assert all(row["bidrop_bytes"] == 0 for row in rows["zero2/vanilla"])  # k = 1: no statistics
    table = done.stdout[done.stdout.index("Projected per-GPU"):]
    for model in ("7B", "13B", "70B"):
        assert f"| {model} | 8 | zero2 |" in table and f"| {model} | 64 | zero3+offload |" in table
    assert "| 0.00 |" in table  # offload: no Bi-Drop bytes per GPU
    # LoRA r=16 on q/v: 7B's 8.4M LoRA elements; Bi-Drop's extra 4 bytes each, sharded over 8 GPUs: 4 MiB
    assert "LoRA r=16 elements" in table and "| 7B | 8 | zero2 |" in table
    assert [line for line in table.splitlines() if line.startswith("| 7B | 8 | zero2 |")][0].endswith("| 8.4M | "
                                                                                                 "12.59 | 4.00 |")
