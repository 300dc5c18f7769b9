"""Counting collectives in a benchmark process (never imported by the package).

`install()` replaces torch.distributed's collectives with counting wrappers; call it BEFORE
`deepspeed.init_distributed` (DeepSpeed caches `all_gather_into_tensor` / `reduce_scatter_tensor`
at init). Bytes per call are the size of the full buffer: the tensor of an all-reduce / broadcast /
reduce, the output of an all-gather, the input of a reduce-scatter.
`CountingCommunicator` wraps a bidrop Communicator (all_reduce_sum) the same way.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(t) for t in obj)
    return 0


# name -> which argument (position, keyword) holds the buffer whose size is counted
_COUNTED = {
    "all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "reduce": (0, "tensor"),
    "all_reduce_coalesced": (0, "tensors"), "all_gather": (0, "tensor_list"),
    "all_gather_into_tensor": (0, "output_tensor"), "_all_gather_base": (0, "output_tensor"),
    "reduce_scatter_tensor": (1, "input"), "_reduce_scatter_base": (1, "input"),
    "reduce_scatter": (1, "input_list"),
}


class Counter:
    def __init__(self) -> None:
        self.enabled = False
        self.tags: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.tagged_calls: dict[str, int] = defaultdict(int)
        self.tagged_bytes: dict[str, int] = defaultdict(int)

    def record(self, op: str, nbytes: int) -> None:
        if not self.enabled:
            return
        self.calls[op] += 1
        self.bytes[op] += nbytes
        if self.tags:
            self.tagged_calls[self.tags[-1]] += 1
            self.tagged_bytes[self.tags[-1]] += nbytes

    @contextmanager
    def counting(self):
        self.reset()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    def total(self) -> tuple[int, int]:
        return sum(self.bytes.values()), sum(self.calls.values())

    def tagged(self, tag: str, fn):
        """fn wrapped so that the collectives it issues are also counted under `tag`."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.tags.append(tag)
            try:
                return fn(*args, **kwargs)
            finally:
                self.tags.pop()
        return wrapper


COUNTER = Counter()
_installed = False


def install() -> Counter:
    global _installed
    if _installed:
        return COUNTER
    for name, (position, keyword) in _COUNTED.items():
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapper(*args, __original=original, __name=name, __pos=position, __kw=keyword, **kwargs):
            buffer = kwargs.get(__kw, args[__pos] if len(args) > __pos else None)
            COUNTER.record(__name, _nbytes(buffer))
            return __original(*args, **kwargs)

        functools.update_wrapper(wrapper, original)
        setattr(dist, name, wrapper)
    _installed = True
    return COUNTER


class CountingCommunicator:
    """Wraps a bidrop Communicator: counts calls and bytes of its all_reduce_sum."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0
        self.bytes = 0
        self.max_bytes = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += _nbytes(tensor)
        self.max_bytes = max(self.max_bytes, _nbytes(tensor))
        return self.inner.all_reduce_sum(tensor)

    def reset(self) -> None:
        self.calls = self.bytes = self.max_bytes = 0
