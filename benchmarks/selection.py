"""Exact distributed threshold (bidrop_ds.core.global_threshold) against gather + torch.kthvalue.

    python benchmarks/selection.py                                   # single rank
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/selection.py
    torchrun --standalone --nproc_per_node 1 benchmarks/selection.py --device cuda --sizes 1e6,1e7,1e8

For P elements per rank (random non-negative float32 scores, n = ceil(0.3 N)) it times the radix
select (4 all-reduces of a 256-bin histogram) and the naive way (all-gather every rank's scores,
then torch.kthvalue on the N = P x ranks concatenation, on every rank), median of --repeats after
one warm-up, and both thresholds must agree. Peak extra memory is the rise of the kernel's peak-RSS
mark (VmHWM, reset right before the call) over the RSS before it (tracemalloc does not see torch),
max over ranks; on CUDA (`--device cuda`, or `auto` with a GPU: nccl, scores on the GPU, timings
synchronised) it is the rise of torch's peak allocated GPU memory. Prints a Markdown table (rank 0)
with the goal (exact faster than gather + kthvalue from P = 1e7) and can write JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from rss import rank_max, reset_peak_rss, status_kib

from bidrop_ds.comm import ProcessGroupCommunicator
from bidrop_ds.core import LocalCommunicator, global_threshold, kept_count


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def measure(fn, repeats: int, cuda: bool = False) -> tuple[float, float, float]:
    """(median seconds, peak extra MiB, result) of fn()."""
    fn()  # warm-up
    times, extra = [], 0.0
    result = None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() / 1024
            torch.cuda.reset_peak_memory_stats()
        else:
            before = status_kib("VmRSS")
            reset_peak_rss()
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 1024 if cuda else status_kib("VmHWM")
        extra = max(extra, (peak - before) / 1024)
    return rank_max(statistics.median(times)), rank_max(extra), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="elements per rank, comma-separated")
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda if torch sees a GPU (nccl), else cpu (gloo)")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    comm = ProcessGroupCommunicator() if dist.is_initialized() else LocalCommunicator()
    rank = dist.get_rank() if dist.is_initialized() else 0
    rows = []
    for size in [int(float(s)) for s in args.sizes.split(",")]:
        g = torch.Generator().manual_seed(rank)
        scores = torch.rand(size, generator=g).square_().to(device)  # non-negative float32
        total = size * world()
        n = kept_count(args.p, total)

        def exact() -> float:
            return global_threshold(scores, n, comm).value

        def gathered() -> float:
            if dist.is_initialized():
                everything = torch.empty(total, dtype=scores.dtype, device=scores.device)
                dist.all_gather_into_tensor(everything, scores)
            else:
                everything = scores
            return torch.kthvalue(everything, total - n + 1).values.item()

        t_exact, m_exact, v_exact = measure(exact, args.repeats, cuda)
        t_gather, m_gather, v_gather = measure(gathered, args.repeats, cuda)
        if v_exact != v_gather:
            raise AssertionError(f"P={size}: exact {v_exact!r} != kthvalue {v_gather!r}")
        rows.append({"device": device.type, "ranks": world(), "P_per_rank": size, "N": total,
                     "exact_s": t_exact, "gather_kthvalue_s": t_gather, "speedup": t_gather / t_exact,
                     "exact_peak_extra_mib": m_exact, "gather_kthvalue_peak_extra_mib": m_gather,
                     "scores_mib": scores.nbytes / 2**20, "goal_faster": "n/a (P < 1e7)" if size < 10**7
                     else ("met" if t_exact < t_gather else "missed")})
        del scores
    if rank == 0:
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
        if args.output_json:
            with open(args.output_json, "w", encoding="utf-8") as handle:
                json.dump({"rows": rows, "command": " ".join(sys.argv)}, handle, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
