"""Per-process memory readings for the benchmarks (Linux /proc), and their max or list over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the peak since the last reset)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def rank_max(value: float) -> float:
    """The largest value over the ranks (the value itself without a process group)."""
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)  # nccl reduces GPU tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def rank_values(value: float) -> list[float]:
    """The value of every rank, in rank order ([value] without a process group)."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
