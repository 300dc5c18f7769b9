"""bidrop_ds.checkpoint: a seeded run resumed from a checkpoint ends bit for bit where the uninterrupted
run does (plain model in one process; DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks), and a tag whose
writer did not finish (marker deleted, save failed, writer SIGKILLed mid-save) is refused by
load_checkpoint and skipped by latest_complete_tag."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.checkpoint import (MARKER, TORCH_FILE, IncompleteCheckpointError, incomplete_reason,
                                  latest_complete_tag, load_checkpoint, read_marker, save_checkpoint)
from tests.distributed import run_distributed
from tests.models import random_batch, tiny_bert

ROOT = Path(__file__).resolve().parents[1]
CONFIG = BiDropConfig(k=2, p=0.3, seed=5)


def _plain_run(seed: int):
    model = tiny_bert(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler, BiDrop(model, optimizer, CONFIG)


def _train(bidrop: BiDrop, scheduler, steps: range, rank: int = 0) -> None:
    for step in steps:
        bidrop.step(random_batch(100 * step + rank))
        if scheduler is not None:
            scheduler.step()


def test_plain_resume_is_bit_for_bit(tmp_path: Path) -> None:
    model, optimizer, scheduler, bidrop = _plain_run(0)
    _train(bidrop, scheduler, range(2))
    save_checkpoint(model, bidrop, tmp_path, "s2", optimizer=optimizer, scheduler=scheduler,
                    client_state={"epoch": 1, "batches_seen": 2})
    _train(bidrop, scheduler, range(2, 4))

    fresh, fresh_optimizer, fresh_scheduler, fresh_bidrop = _plain_run(1)  # another init: the load must count
    client = load_checkpoint(fresh, fresh_bidrop, tmp_path, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert client == {"epoch": 1, "batches_seen": 2} and fresh_bidrop.step_index == 2
    _train(fresh_bidrop, fresh_scheduler, range(2, 4))
    assert fresh_bidrop.step_index == bidrop.step_index == 4
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert_same_optimizer_state(optimizer.state_dict(), fresh_optimizer.state_dict())
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for key, state in a["state"].items():
        assert state.keys() == b["state"][key].keys()
        assert all(torch.equal(state[name], b["state"][key][name]) for name in state), key


def test_incomplete_tags_are_refused_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, _, bidrop = _plain_run(0)
    for tag in ("a", "b"):
        _train(bidrop, None, range(bidrop.step_index, bidrop.step_index + 1))
        save_checkpoint(model, bidrop, tmp_path, tag, optimizer=optimizer, description={"run": tag})
    assert latest_complete_tag(tmp_path) == "b"
    marker = read_marker(tmp_path, "b")
    assert (marker["description"], marker["step_index"], marker["world_size"], marker["kind"]) == ({"run": "b"}, 2, 1,
                                                                                                 "torch")
    (tmp_path / "b" / MARKER).unlink()  # what a writer killed before the marker leaves
    assert latest_complete_tag(tmp_path) == "a"
    with pytest.raises(IncompleteCheckpointError, match=f"read_marker: .*no {MARKER}"):
        read_marker(tmp_path, "b")
    with pytest.raises(IncompleteCheckpointError, match=rf"refusing tag 'b': rank 0: .*no {MARKER}.*killed mid-save"):
        load_checkpoint(model, bidrop, tmp_path, "b", optimizer=optimizer)
    load_checkpoint(model, bidrop, tmp_path, optimizer=optimizer)  # no tag: the latest complete one
    assert bidrop.step_index == 1

    # a failed re-save of a complete tag leaves it incomplete, not vouched for by its old marker
    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, bidrop, tmp_path, "a", optimizer=optimizer)
    assert "no bidrop_complete.json" in incomplete_reason(tmp_path, "a")
    assert latest_complete_tag(tmp_path) is None
    monkeypatch.undo()

    # a file that changed size after the marker was written is caught too
    save_checkpoint(model, bidrop, tmp_path, "c", optimizer=optimizer)
    with open(tmp_path / "c" / TORCH_FILE, "r+b") as handle:
        handle.truncate(100)
    assert "has 100 bytes" in incomplete_reason(tmp_path, "c") and latest_complete_tag(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        load_checkpoint(model, bidrop, tmp_path, optimizer=optimizer)


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from bidrop_ds import BiDrop, BiDropConfig
    from bidrop_ds.checkpoint import save_checkpoint

    class Stall:
        '''Pickled inside torch.save: says so, then stalls until the test kills the process.'''
        def __reduce__(self):
            Path(sys.argv[2]).write_text("saving")
            time.sleep(120)

    model = nn.Sequential()
    model.layers = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 1))  # as in the test
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bidrop = BiDrop(model, optimizer, BiDropConfig(k=2, seed=0))
    loss_fn = lambda m, x: m.layers(x).square().mean()
    bidrop.step(torch.ones(4, 8), loss_fn=loss_fn)
    save_checkpoint(model, bidrop, sys.argv[1], "step1", optimizer=optimizer)
    bidrop.step(torch.ones(4, 8), loss_fn=loss_fn)
    save_checkpoint(model, bidrop, sys.argv[1], "step2", optimizer=optimizer, client_state={"stall": Stall()})
""")


def test_writer_killed_mid_save_leaves_a_refused_tag(tmp_path: Path) -> None:
    """A real process SIGKILLed while torch.save is writing tag step2 (after step1 completed)."""
    ready = tmp_path / "saving"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "ckpt"), str(ready)], env=env,
                          stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        stderr = proc.communicate()[1]
    assert ready.exists(), f"the writer never reached the save:\n{stderr[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "ckpt" / "step2").is_dir() and not (tmp_path / "ckpt" / "step2" / MARKER).exists()
    assert latest_complete_tag(tmp_path / "ckpt") == "step1"
    model = torch.nn.Sequential()
    model.layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bidrop = BiDrop(model, optimizer, BiDropConfig(k=2, seed=0))
    with pytest.raises(IncompleteCheckpointError, match="refusing tag 'step2'"):
        load_checkpoint(model, bidrop, tmp_path / "ckpt", "step2", optimizer=optimizer)
    load_checkpoint(model, bidrop, tmp_path / "ckpt", optimizer=optimizer)
    assert bidrop.step_index == 1


# ----- DeepSpeed ZeRO-2 / ZeRO-3 on 2 gloo ranks --------------------------------------------------

def _engine(stage: int, init_seed: int):
    import deepspeed

    from tests.backends.zero_oracle import ds_config

    model = tiny_bert(seed=init_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config(stage, "fp32", 1, torch.distributed.get_world_size()))
    return engine, BiDrop(engine, config=CONFIG)


def _optimizer_state(engine) -> dict:
    """A copy of the torch optimizer's state over this rank's fp32 partitions (ZeRO-3 lists those
    partitions in its param groups only inside its own state_dict())."""
    if engine.zero_optimization_stage() == 3:
        return copy.deepcopy(engine.optimizer.state_dict()["optimizer_state_dict"])
    return copy.deepcopy(engine.optimizer.optimizer.state_dict())


def _deepspeed_resume(rank: int, world_size: int, directory: str, stages: list[int]) -> list[dict]:
    from tests.backends.zero_oracle import MICRO

    def train(bidrop: BiDrop, steps: range) -> None:
        for step in steps:
            bidrop.step([random_batch(100 * step + rank, size=MICRO)])

    rows = []
    for stage in stages:
        where = Path(directory) / f"zero{stage}"
        engine, bidrop = _engine(stage, init_seed=0)
        train(bidrop, range(2))
        save_checkpoint(engine, bidrop, where, "s2", client_state={"batches_seen": 2})
        deepspeed_latest = (where / "latest").read_text()  # DeepSpeed's pointer, written after the marker
        train(bidrop, range(2, 4))
        straight = (bidrop.backend.master_snapshot(), _optimizer_state(engine),
                    engine.lr_scheduler.get_last_lr(), bidrop.step_index)
        engine.destroy()

        engine, bidrop = _engine(stage, init_seed=1)  # another init: the load must count
        client = load_checkpoint(engine, bidrop, where)
        loaded_step = bidrop.step_index
        train(bidrop, range(2, 4))
        assert_same_optimizer_state(_optimizer_state(engine), straight[1])  # fails the run with this rank's traceback
        row = {"stage": stage, "deepspeed_latest": deepspeed_latest, "client": client, "loaded_step": loaded_step,
               "step_index": bidrop.step_index, "straight_step_index": straight[3],
               "master_equal": bool(torch.equal(bidrop.backend.master_snapshot(), straight[0])),
               "lr_equal": engine.lr_scheduler.get_last_lr() == straight[2]}

        # a tag whose marker is missing: refused on every rank (none enters DeepSpeed's load), skipped by lookup
        save_checkpoint(engine, bidrop, where, "s4")
        row["latest_before"] = latest_complete_tag(where)
        torch.distributed.barrier()
        if rank == 0:
            (where / "s4" / MARKER).unlink()
        torch.distributed.barrier()
        row["latest_after"] = latest_complete_tag(where)
        try:
            load_checkpoint(engine, bidrop, where, "s4")
            row["refusal"] = None
        except IncompleteCheckpointError as err:
            row["refusal"] = str(err)
        engine.destroy()
        rows.append(row)
    return rows


def test_deepspeed_zero_resume_is_bit_for_bit(tmp_path: Path) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ranks = run_distributed(_deepspeed_resume, world_size=2, timeout_s=300, directory=str(tmp_path), stages=[2, 3])
    for rows in ranks:
        assert [row["stage"] for row in rows] == [2, 3]
        for row in rows:
            assert row["client"] == {"batches_seen": 2} and row["loaded_step"] == 2, row
            assert row["step_index"] == row["straight_step_index"] == 4, row
            assert row["master_equal"] and row["lr_equal"], row
            assert (row["deepspeed_latest"], row["latest_before"], row["latest_after"]) == ("s2", "s4", "s2"), row
            assert row["refusal"] is not None and "refusing tag 's4': rank 0:" in row["refusal"], row
            assert "rank 1:" in row["refusal"] and "killed mid-save" in row["refusal"], row
