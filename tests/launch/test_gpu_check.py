"""launch/gpu_check.sh's bench mode, run here as `bench-dry`: the same three benchmark commands on
the CPU at a tiny size, then benchmarks/gpu_summary.py. The GPU run happens only when a device is
lent, so this is what keeps its arguments, JSON keys and summary from rotting in between."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.conftest import ROOT
from tests.launching import run_in_session

pytest.importorskip("deepspeed")

GPU_CHECK = ROOT / "launch" / "gpu_check.sh"
SUMMARY = ROOT / "benchmarks" / "gpu_summary.py"


def test_bench_dry_runs_every_part_and_prints_each_goal(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = run_in_session(["bash", str(GPU_CHECK), "bench-dry"], env, timeout=420, what="gpu_check.sh bench-dry")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    step = json.loads((tmp_path / "step_zero2_bf16.json").read_text())
    assert (step["device"], step["stage"], step["dtype"], step["ranks"]) == ("cpu", 2, "bf16", 1)
    assert step["plugin_bytes_per_rank"] <= step["bound_bytes_per_rank"] + 2**20
    assert step["extra_comm_calls_per_step"] <= 4 and step["extra_comm_max_call_bytes"] <= 8192
    for row, trained in (("full", "all"), ("lora", "lora")):  # the decoder SFT rows (ZeRO-3, Llama)
        sft = json.loads((tmp_path / f"step_sft_{row}.json").read_text())
        assert (sft["stage"], sft["dtype"], sft["step_time_goal"]) == (3, "bf16", "<= 1.03"), row
        assert (sft["trainable_params"] == sft["params"]) == (trained == "all"), row
        assert sft["plugin_bytes_per_rank"] == sft["bound_bytes_per_rank"] == 4 * sft["eligible_owned_elements"]
    assert "decoder SFT llama, " in done.stdout and "decoder SFT llama+lora16, " in done.stdout
    sizes = [row["P_per_rank"] for row in json.loads((tmp_path / "selection.json").read_text())["rows"]]
    assert sizes == [10**4, 10**5]
    assert all(row["identical"] for row in json.loads((tmp_path / "apply_mask.json").read_text())["rows"])
    summary = done.stdout[done.stdout.index("== figures next to their goals"):]
    assert "step time Bi-Drop / (k x vanilla)" in summary and "(goal <= 1.05: " in summary
    assert summary.count("selection P = ") == 2 and "same threshold and update: True" in summary
    assert "no result" not in summary
    assert summary in (tmp_path / "gpu_bench.log").read_text()  # the whole output also goes to $OUT


def test_summary_names_each_missing_result(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path)], capture_output=True, text=True, check=True)
    for name in ("step_zero2_bf16.json", "selection.json", "apply_mask.json", "step_sft_full.json",
                 "step_sft_lora.json"):
        assert f"{name}: no result" in done.stdout


def test_unknown_mode_is_refused() -> None:
    done = subprocess.run(["bash", str(GPU_CHECK), "benchmark"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: bash launch/gpu_check.sh [tests|bench|bench-dry|all]" in done.stderr
