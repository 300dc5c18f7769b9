"""Communicators, single process (the 2-rank sum is checked in tests/core/test_select.py's launch)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import bidrop_ds.comm as comm
from bidrop_ds.comm import ProcessGroupCommunicator, default_communicator
from bidrop_ds.core.select import LocalCommunicator


def test_default_without_process_group_is_local():
    """No process group initialised: the local communicator, whose all-reduce is the identity."""
    assert not dist.is_initialized()
    local = default_communicator()
    assert isinstance(local, LocalCommunicator)
    tensor = torch.arange(5)
    local.all_reduce_sum(tensor)
    assert torch.equal(tensor, torch.arange(5))


def test_default_with_process_group(monkeypatch):
    """An initialised default group gives a ProcessGroupCommunicator on the default group (None)."""
    monkeypatch.setattr(comm.dist, "is_initialized", lambda: True)
    got = default_communicator()
    assert isinstance(got, ProcessGroupCommunicator) and got.group is None


def test_process_group_communicator_sums_in_place_on_its_group(monkeypatch):
    """all_reduce_sum is an in-place SUM all-reduce on the communicator's group."""
    calls = []

    def fake_all_reduce(tensor, op=None, group=None):
        calls.append((op, group))
        tensor.mul_(2)  # stand-in for the sum over two equal ranks

    monkeypatch.setattr(comm.dist, "all_reduce", fake_all_reduce)
    group = object()
    tensor = torch.ones(3, dtype=torch.int64)
    assert ProcessGroupCommunicator(group).all_reduce_sum(tensor) is None
    assert torch.equal(tensor, torch.full((3,), 2)) and calls == [(dist.ReduceOp.SUM, group)]


def test_close_process_group_collects_then_destroys_the_default_group(tmp_path, monkeypatch):
    """A one-rank gloo group: garbage is collected before the barrier, and the group is gone after."""
    order = []
    monkeypatch.setattr(comm.gc, "collect", lambda: order.append("collect"))
    barrier = dist.barrier
    monkeypatch.setattr(comm.dist, "barrier", lambda: (order.append("barrier"), barrier()))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    comm.close_process_group()
    assert order == ["collect", "barrier"]
    assert not dist.is_initialized()
