"""launch/finetune.py as 2 nodes x 1 rank on localhost (two torchrun agents, --nnodes 2) under ZeRO-3:
it ends equal to the 1-node 2-rank run with the same seed (metrics and saved fp32 weights)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch.conftest import ROOT, SCRIPT, small_run
from tests.launch.test_finetune_deepspeed import run_ok

pytest.importorskip("deepspeed")

TIMEOUT = 240
COMPARED = ("eval_loss", "accuracy", "train_loss_last_epoch", "mean_kept_fraction", "steps", "ranks",
            "built_elements_per_rank", "eligible_owned_elements_per_rank")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_node_run(args: list[str]) -> list[subprocess.CompletedProcess]:
    """One torchrun agent per node (node ranks 0 and 1, 1 rank each) meeting at 127.0.0.1; each in its
    own session, so that a hang is ended for both agents and their ranks."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    port = str(_free_port())
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
                                str(SCRIPT), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True) for node in (0, 1)]
    done = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for agent in agents:  # SIGTERM first: an agent then stops its rank, which runs in a session of its own
            os.killpg(agent.pid, signal.SIGTERM)
        for agent in agents:
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
        pytest.fail(f"the 2-node run did not finish in {TIMEOUT} s")
    return done


def test_two_nodes_end_equal_to_one_node(tiny_llama_model: Path, vader_cache: Path, tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    args = ["--deepspeed", str(ROOT / "ds_configs" / "zero3_bf16.json"),
            *small_run(tiny_llama_model, "--model_dropout", "0.1", "--seed", "3", "--chunks", "2")]
    one_node = run_ok(tmp_path, *args, "--save_dir", str(tmp_path / "one"))
    nodes = two_node_run([*args, "--save_dir", str(tmp_path / "two"), "--output_json", str(tmp_path / "two.json")])
    for node, done in enumerate(nodes):
        assert done.returncode == 0, (f"node {node}: exit {done.returncode}\n{done.stdout[-3000:]}\n"
                                      f"{done.stderr[-6000:]}")
        assert "terminate called" not in done.stderr
    assert "done: vader-movie" in nodes[0].stdout and "done: vader-movie" not in nodes[1].stdout
    two_nodes = json.loads((tmp_path / "two.json").read_text())
    assert {key: two_nodes[key] for key in COMPARED} == {key: one_node[key] for key in COMPARED}
    # built inside zero.Init: each rank held only its partition of the model from the start
    assert all(held <= one_node["model_elements"] // 2 + 64 for held in one_node["built_elements_per_rank"])
    tag = f"step{one_node['steps']}"
    weights = [get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / run), tag=tag) for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
