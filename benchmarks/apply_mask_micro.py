"""Microbenchmark of the math in one Bi-Drop `apply_mask` (scores, exact selection, mask write):
the previous implementation against the current one, interleaved in one process.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/apply_mask_micro.py            # CPU, 2.7M + 11.7M
    python benchmarks/apply_mask_micro.py --device cuda --models 24x1024 --ranks 1       # one GPU, BERT-large

Realistic inputs: a config-built BERT (vocab 8192, `--models LAYERSxHIDDEN`, e.g. 4x256 = the
step-time benchmark's model, 5.36M parameters; 6x512 = 23.4M) runs k = 2 forward+backward passes
with dropout on one random batch; the real gradients are folded into `PassStatistics` (Welford) in
the flat parameter order, as DeepSpeed ZeRO-2 lays out its fp32 partition, and `--ranks R` cuts
that into R equal partitions (4x256 over 2 ranks gives 2,678,145 elements each, 6x512 11,719,937).
Each partition is measured on its own: rank 0's is mostly the word embedding (ineligible: score
-1), the last rank's mostly transformer blocks. Per repeat, both implementations start from the
same statistics and run: scores into M2 with the ineligible elements at -1 (`scores`; old: all
scored, then marked; new: `ineligible=` ranges, not scored), the threshold (`select`, one process:
a local communicator), ineligible marked +inf and the masked mean (`mask`; old `masked_fill_`,
new `mask_update_`). The order alternates between repeats; the table reports medians per stage and the ratio
old / new (> 1: the current code is faster). Both must give the same threshold, kept count and
update, which is checked on every repeat. `--output_json` writes the rows.

"old" is the code as of commit a4eee81 (byte-wise radix select: four rounds of uint8 bincount with
boolean-index compaction; full-size temporaries in the scores; `masked_fill_` with a bool mask),
kept verbatim below.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bidrop_ds.config import BiDropConfig  # noqa: E402
from bidrop_ds.core import LocalCommunicator, PassStatistics, global_threshold, kept_count  # noqa: E402
from bidrop_ds.core.scores import mask_update_, scores_into_m2  # noqa: E402
from bidrop_ds.core.select import Threshold  # noqa: E402

# ------------------------------------------------------------------ the previous implementation
_BYTES_HIGH_TO_LOW = (3, 2, 1, 0) if sys.byteorder == "little" else (0, 1, 2, 3)


def legacy_scores_into_m2(stats: PassStatistics, abs_param: torch.Tensor, kind: str, eps: float,
                          grad_scale: float = 1.0) -> torch.Tensor:
    out, mean, k = stats.m2, stats.mean, stats.count
    if kind in ("product", "perturbation"):
        abs_mean = mean.abs()
        out.div_(k).sqrt_().add_(eps * grad_scale)
        torch.div(abs_mean, out, out=out)
        if kind == "product":
            out.mul_(abs_mean.div_(abs_param.float().add(eps)))
        return out
    if kind == "scaling":
        return torch.div(mean.abs(), abs_param.float().add(eps), out=out)
    raise ValueError(kind)


def legacy_global_threshold(scores: torch.Tensor, n: int, comm) -> Threshold | None:
    columns = scores.contiguous().view(torch.uint8).view(-1, 4)
    alive = None
    prefix = above = 0
    remaining = n
    for round_index, column in enumerate(_BYTES_HIGH_TO_LOW):
        digits = columns[:, column]
        hist = torch.bincount(digits if alive is None else digits[alive], minlength=256)
        if round_index == 0:
            flagged = torch.cat([hist, torch.tensor([0], device=hist.device)])
            comm.all_reduce_sum(flagged)
            if int(flagged[-1]) > 0:
                return None
            hist = flagged[:-1]
        else:
            comm.all_reduce_sum(hist)
        counts = hist.tolist()
        if round_index == 0:
            counts[128:] = [0] * 128
        for digit in range(255, -1, -1):
            if counts[digit] >= remaining:
                break
            remaining -= counts[digit]
            above += counts[digit]
        prefix = (prefix << 8) | digit
        if round_index < 3:
            same = digits == digit
            alive = same if alive is None else alive.logical_and_(same)
    value = torch.tensor([prefix - (1 << 32) if prefix >= 1 << 31 else prefix], dtype=torch.int32)
    return Threshold(value=value.view(torch.float32).item(), kept=above + counts[digit])


# ------------------------------------------------------------------------------- the inputs
def real_statistics(layers: int, hidden: int, device: torch.device, k: int = 2, seed: int = 0,
                    vocab_size: int = 8192):
    """(mean, m2, theta, eligible) over every parameter of a config-built BERT, flat, fp32, from k
    dropout passes on one random batch (16 x 64 tokens, as in benchmarks/step_time.py)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden, max_position_embeddings=128, num_labels=2)).to(device)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(0, vocab_size, (16, 64), generator=gen).to(device),
             "labels": torch.randint(0, 2, (16,), generator=gen).to(device)}
    named = list(model.named_parameters())
    stats = PassStatistics(sum(p.numel() for _, p in named), device=device)
    for _ in range(k):
        model.zero_grad(set_to_none=False)
        model(**batch).loss.backward()
        stats.update([p.grad for _, p in named])
    config = BiDropConfig()
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    eligible_ranges, offset = [], 0
    for name, param in named:
        if config.is_eligible(name):
            eligible_ranges.append((offset, offset + param.numel()))
        offset += param.numel()
    del model
    return stats, theta, eligible_ranges


def partitions(stats: PassStatistics, theta: torch.Tensor, eligible: list[tuple[int, int]], ranks: int):
    """ZeRO-2's equal partitions of the flat order: (rank, mean, m2, |theta|, ineligible ranges)."""
    total = stats.mean.numel()
    size = math.ceil(total / ranks)
    for rank in range(ranks):
        lo, hi = rank * size, min((rank + 1) * size, total)
        keep = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in eligible if a < hi and b > lo]
        ineligible, cursor = [], 0
        for a, b in keep:
            if a > cursor:
                ineligible.append((cursor, a))
            cursor = b
        if cursor < hi - lo:
            ineligible.append((cursor, hi - lo))
        yield (rank, stats.mean[lo:hi].clone(), stats.m2[lo:hi].clone(), theta[lo:hi].abs(), ineligible,
               sum(b - a for a, b in keep))


# ------------------------------------------------------------------------------- the timing
def mark(scores: torch.Tensor, ranges: list[tuple[int, int]], value: float) -> None:
    for start, end in ranges:
        scores[start:end] = value


def run_once(impl: str, mean, m2, abs_theta, ineligible, n, sync) -> tuple[dict, Threshold, torch.Tensor]:
    stats = PassStatistics(mean.numel(), device=mean.device)
    stats.mean.copy_(mean)
    stats.m2.copy_(m2)
    stats.count = 2
    comm = LocalCommunicator()
    times = {}
    sync()
    start = time.perf_counter()
    if impl == "old":
        scores = legacy_scores_into_m2(stats, abs_theta, "product", 1e-8)
        mark(scores, ineligible, -1.0)
    else:  # the ineligible elements get -1 without being scored
        scores = scores_into_m2(stats, abs_theta, "product", 1e-8, ineligible=ineligible)
    sync()
    times["scores"] = time.perf_counter() - start
    start = time.perf_counter()
    found = (legacy_global_threshold if impl == "old" else global_threshold)(scores, n, comm)
    sync()
    times["select"] = time.perf_counter() - start
    start = time.perf_counter()
    mark(scores, ineligible, float("inf"))
    update = stats.mean
    if impl == "old":
        update.masked_fill_(scores < found.value, 0.0)
    else:
        mask_update_(update, scores, found.value)
    sync()
    times["mask"] = time.perf_counter() - start
    times["total"] = times["scores"] + times["select"] + times["mask"]
    return times, found, update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="4x256,6x512", help="LAYERSxHIDDEN BERT shapes, comma-separated")
    parser.add_argument("--ranks", type=int, default=2, help="ZeRO-2 partitions of the flat parameters")
    parser.add_argument("--vocab_size", type=int, default=8192, help="BERT's own: 30522")
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for shape in args.models.split(","):
        layers, hidden = (int(x) for x in shape.lower().split("x"))
        stats, theta, eligible = real_statistics(layers, hidden, device, vocab_size=args.vocab_size)
        total_eligible = sum(b - a for a, b in eligible)
        n_global = kept_count(args.p, total_eligible)
        for rank, mean, m2, abs_theta, ineligible, local_eligible in partitions(stats, theta, eligible, args.ranks):
            # one process stands for one rank: select the same fraction of this rank's candidates
            n = kept_count(args.p, local_eligible) if args.ranks > 1 else n_global
            if n == 0:
                continue
            samples: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
            ratios: dict[str, list[float]] = {}
            for repeat in range(args.repeats + 1):  # the first is a warm-up
                order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
                results = {impl: run_once(impl, mean, m2, abs_theta, ineligible, n, sync) for impl in order}
                (t_old, f_old, u_old), (t_new, f_new, u_new) = results["old"], results["new"]
                same = (f_old.value, f_old.kept) == (f_new.value, f_new.kept) and torch.equal(u_old, u_new)
                if not same:  # on CPU the two must agree bit for bit; elsewhere report it and go on
                    message = f"{shape} rank {rank}: old {f_old} != new {f_new} or the updates differ"
                    if device.type == "cpu":
                        raise AssertionError(message)
                    print("MISMATCH " + message, flush=True)
                identical = same and (repeat == 0 or identical)
                if repeat == 0:
                    continue
                for impl, times in (("old", t_old), ("new", t_new)):
                    for stage, seconds in times.items():
                        samples[impl].setdefault(stage, []).append(seconds)
                for stage in t_old:
                    ratios.setdefault(stage, []).append(t_old[stage] / t_new[stage])
            row = {"device": device.type, "model": f"bert {shape}", "rank": f"{rank}/{args.ranks}",
                   "elements": mean.numel(), "ineligible_frac": 1 - local_eligible / mean.numel(),
                   "threshold": f_new.value, "kept": f_new.kept, "identical": identical}
            for stage in ("scores", "select", "mask", "total"):
                row[f"old_{stage}_ms"] = 1e3 * statistics.median(samples["old"][stage])
                row[f"new_{stage}_ms"] = 1e3 * statistics.median(samples["new"][stage])
                row[f"{stage}_speedup"] = statistics.median(ratios[stage])
            rows.append(row)
            print(f"{row['model']} rank {row['rank']}: {row['elements']:,} elements, total "
                  f"{row['old_total_ms']:.1f} -> {row['new_total_ms']:.1f} ms (x{row['total_speedup']:.2f})",
                  flush=True)
        del stats, theta
    keys = ["device", "model", "rank", "elements", "ineligible_frac"] + [
        f"{which}_{stage}" for stage in ("scores", "select", "mask", "total") for which in ("old", "new", "speed")]
    print()
    print("| " + " | ".join(k.replace("speed_", "speedup_") for k in keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = []
        for key in keys:
            if key.startswith(("old_", "new_")):
                cells.append(f"{row[key + '_ms']:.2f}")
            elif key.startswith("speed_"):
                cells.append(f"x{row[key[6:] + '_speedup']:.2f}")
            elif isinstance(row[key], float):
                cells.append(f"{row[key]:.3f}")
            else:
                cells.append(f"{row[key]:,}" if isinstance(row[key], int) else str(row[key]))
        print("| " + " | ".join(cells) + " |")
    print(f"\n(ms: median of {args.repeats} interleaved repeats; speedup: median of old / new per repeat; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()})")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "command": " ".join(sys.argv)}, handle, indent=2)


if __name__ == "__main__":
    main()
