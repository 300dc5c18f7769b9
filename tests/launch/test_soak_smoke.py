"""benchmarks/soak.py for 30 steps on 2 real ZeRO-3 ranks (torchrun, gloo): the injected NaN passes
are skipped on both ranks and nowhere else, the checks pass and the JSON report is written.
(The soak itself, 2000 steps, is a benchmark, not part of the suite.)"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.launch.conftest import ROOT
from tests.launching import run_in_session

pytest.importorskip("deepspeed")


def test_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "benchmarks" / "soak.py"), "--steps", "30", "--fault_every", "10", "--rss_every", "5",
               "--warmup_steps", "10", "--rss_tolerance", "0.5", "--checkpoint_every", "15", "--dist_timeout", "60",
               "--output_json", str(out)]
    done = run_in_session(command, env, timeout=180, what="the 30-step soak")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    summary = json.loads(out.read_text())
    assert (summary["steps"], summary["stage"], summary["ranks"]) == (30, 3, 2)
    assert summary["skips_expected"] == 3 and summary["skips_seen_per_rank"] == [3, 3]
    assert summary["mismatched_steps"] == [] and summary["master_moved_on_skipped_steps"] == []
    assert summary["engine_global_steps_per_rank"] == [27, 27]
    assert len(summary["checks"]) == 7 and all(summary["checks"].values()) and summary["ok"]
    assert [row["samples"] for row in summary["rss_after_warmup"]] == [5, 5]  # steps 10, 15, ..., 30
    # step 29 was a fault, so the final burst reaches the limit one fault early
    limit = summary["max_consecutive_skips"]
    assert limit > 1 and summary["skip_limit_raised_after_burst_steps_per_rank"] == [limit - 1] * 2
    assert "| skipped exactly the injected steps on every rank | ok |" in done.stdout
