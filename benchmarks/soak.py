"""Soak: a long Bi-Drop run on DeepSpeed ZeRO ranks with injected faults, checked at every step.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/soak.py

A tiny config-built BERT (ZeRO-3, fp32, AdamW, seeded passes) runs --steps Bi-Drop steps. Every
--fault_every-th step one pass on one rank gets a NaN loss (the rank and the pass rotate). Checked:
- every rank skips exactly the injected steps (and only those), the fp32 master weights stay
  bit for bit through each skipped step, and the engine stepped once per step that was not skipped;
- no hang: collectives time out after --dist_timeout (`bidrop_ds.training.dist.init_distributed`),
  and a lost rank ends the run with the recipes' one-line "lost contact" report;
- memory: VmRSS sampled every --rss_every steps; after --warmup_steps it must stay within
  --rss_tolerance (relative) of its first sample after the warm-up, on every rank;
- a final burst of faults in a row (the ranks take turns) raises SkipLimitError on every rank after
  exactly `max_consecutive_skips` of them (the config's default);
- every --checkpoint_every steps a checkpoint (bidrop_ds.checkpoint) is saved; the last one must be
  the latest complete tag at the end.
Rank 0 prints a Markdown summary and writes JSON (--output_json). Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rss import status_kib  # noqa: E402  (benchmarks/ helper)

from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from bidrop_ds import BiDrop, BiDropConfig  # noqa: E402
from bidrop_ds.bidrop import SkipLimitError  # noqa: E402
from bidrop_ds.checkpoint import latest_complete_tag, save_checkpoint  # noqa: E402
from bidrop_ds.comm import close_process_group  # noqa: E402
from bidrop_ds.training.dist import abandon_distributed, init_distributed, lost_contact_message  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=16)
    parser.add_argument("--fault_every", type=int, default=50, help="a NaN pass on one rank every N-th step")
    parser.add_argument("--rss_every", type=int, default=50, help="sample VmRSS every N steps")
    parser.add_argument("--warmup_steps", type=int, default=200, help="RSS samples before this step are not judged")
    parser.add_argument("--rss_tolerance", type=float, default=0.05,
                        help="allowed relative RSS drift after the warm-up (max and last vs first sample)")
    parser.add_argument("--checkpoint_every", type=int, default=500, help="save a checkpoint every N steps (0: never)")
    parser.add_argument("--checkpoint_dir", default=None, help="default: a temporary folder, removed at the end")
    parser.add_argument("--dist_timeout", type=float, default=120.0, help="seconds a collective may wait")
    parser.add_argument("--output_json", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    for name in ("steps", "fault_every", "rss_every", "micro_batch", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.steps // args.rss_every * args.rss_every < args.warmup_steps:
        parser.error(f"no RSS sample after the warm-up: --steps {args.steps} must reach --warmup_steps "
                     f"{args.warmup_steps} and a multiple of --rss_every {args.rss_every} after it")
    return args


def fault_at(step: int, args: argparse.Namespace, world: int) -> tuple[int, int] | None:
    """(rank, pass) that gets a NaN loss at this step, or None. Rotates over ranks, then passes."""
    if (step + 1) % args.fault_every:
        return None
    n = (step + 1) // args.fault_every
    return n % world, (n // world) % args.k


def build(args: argparse.Namespace):
    import deepspeed

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=max(32, args.seq_len), num_labels=2, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1))
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "train_batch_size": args.micro_batch * dist.get_world_size(), "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=config)
    return engine, BiDrop(engine, config=BiDropConfig(k=args.k, p=args.p, seed=0))


def batch_for(step: int, rank: int, world: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step * world + rank)
    return {"input_ids": torch.randint(0, VOCAB, (args.micro_batch, args.seq_len), generator=g),
            "labels": torch.randint(0, 2, (args.micro_batch,), generator=g)}


def poisoned(pass_index: int):
    """A loss function whose pass `pass_index` (counted over its calls: one chunk per pass) is NaN."""
    calls = iter(range(10**9))

    def loss_fn(model, chunk):
        loss = model(**chunk).loss
        return loss * float("nan") if next(calls) == pass_index else loss

    return loss_fn


def soak(args: argparse.Namespace, checkpoint_dir: Path) -> dict[str, Any]:
    """The run on this rank; returns its own record (rank 0 merges them)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine, bidrop = build(args)
    expected, seen, mismatches, moved_on_skip = [], [], [], []
    rss: list[tuple[int, int]] = []
    step_seconds: list[float] = []
    saved = None
    started = time.perf_counter()
    for step in range(args.steps):
        fault = fault_at(step, args, world)
        before = bidrop.backend.master_snapshot() if fault is not None else None
        tick = time.perf_counter()
        result = bidrop.step([batch_for(step, rank, world, args)],
                             loss_fn=poisoned(fault[1]) if fault is not None and fault[0] == rank else None)
        step_seconds.append(time.perf_counter() - tick)
        if fault is not None:
            expected.append(step)
            if not torch.equal(before, bidrop.backend.master_snapshot()):
                moved_on_skip.append(step)
        if result.skipped:
            seen.append(step)
        if result.skipped != (fault is not None):
            mismatches.append(step)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            saved = f"step{step + 1}"
            save_checkpoint(engine, bidrop, checkpoint_dir, saved)
        if (step + 1) % args.rss_every == 0:
            rss.append((step + 1, status_kib("VmRSS")))
    seconds = time.perf_counter() - started
    record = {"rank": rank, "expected": expected, "seen": seen, "mismatches": mismatches,
              "moved_on_skip": moved_on_skip, "rss_kib": rss, "seconds": seconds,
              "max_step_s": max(step_seconds), "median_step_s": sorted(step_seconds)[len(step_seconds) // 2],
              "bidrop_skipped_steps": bidrop.skipped_steps, "engine_global_steps": engine.global_steps,
              "last_saved": saved, "latest_complete": latest_complete_tag(checkpoint_dir) if saved else None,
              "skip_limit": bidrop.config.max_consecutive_skips, "in_a_row_before_burst": bidrop.consecutive_skips,
              "skip_limit_raised_after": None}
    # Finally a burst of faults (the ranks take turns): SkipLimitError at the limit, on every rank.
    for extra in range(bidrop.config.max_consecutive_skips):
        step = args.steps + extra
        try:
            bidrop.step([batch_for(step, rank, world, args)], loss_fn=poisoned(0) if extra % world == rank else None)
        except SkipLimitError:
            record["skip_limit_raised_after"] = extra + 1
            break
    engine.destroy()
    return record


def judge(records: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """The summary over ranks and the verdict of every check."""
    expected = records[0]["expected"]
    summary: dict[str, Any] = {
        "steps": args.steps, "ranks": len(records), "stage": args.stage, "k": args.k, "p": args.p,
        "fault_every": args.fault_every, "seconds": max(r["seconds"] for r in records),
        "median_step_s": max(r["median_step_s"] for r in records), "max_step_s": max(r["max_step_s"] for r in records),
        "skips_expected": len(expected), "skips_seen_per_rank": [len(r["seen"]) for r in records],
        "mismatched_steps": sorted({s for r in records for s in r["mismatches"]}),
        "master_moved_on_skipped_steps": sorted({s for r in records for s in r["moved_on_skip"]}),
        "bidrop_skipped_steps_per_rank": [r["bidrop_skipped_steps"] for r in records],
        "engine_global_steps_per_rank": [r["engine_global_steps"] for r in records],
        "max_consecutive_skips": records[0]["skip_limit"],
        "skip_limit_raised_after_burst_steps_per_rank": [r["skip_limit_raised_after"] for r in records],
    }
    rss_rows = []
    for r in records:
        judged = [kib for step, kib in r["rss_kib"] if step >= args.warmup_steps]
        first, last, peak = judged[0], judged[-1], max(judged)
        rss_rows.append({"rank": r["rank"], "first_mib": first / 1024, "last_mib": last / 1024, "max_mib": peak / 1024,
                         "min_mib": min(judged) / 1024, "drift": max(peak, last) / first - 1, "samples": len(judged)})
    summary["rss_after_warmup"] = rss_rows
    summary["rss_samples_kib"] = {r["rank"]: r["rss_kib"] for r in records}
    checks = {
        "skipped exactly the injected steps on every rank": all(r["seen"] == expected for r in records)
        and not summary["mismatched_steps"],
        "master weights unchanged through skipped steps": not summary["master_moved_on_skipped_steps"],
        "engine stepped once per step not skipped": all(r["engine_global_steps"] == args.steps - len(expected)
                                                          for r in records),
        "skip counter = injected faults": all(r["bidrop_skipped_steps"] == len(expected) for r in records),
        "SkipLimitError after max_consecutive_skips faults in a row, on every rank": all(
            r["skip_limit"] > 0 and r["skip_limit_raised_after"] == r["skip_limit"] - r["in_a_row_before_burst"]
            for r in records),
        f"RSS within {args.rss_tolerance:.0%} after warm-up": all(row["drift"] <= args.rss_tolerance
                                                                  for row in rss_rows),
    }
    if args.checkpoint_every:
        checks["last checkpoint is the latest complete one"] = all(
            r["latest_complete"] == r["last_saved"] is not None for r in records)
    summary["checks"] = checks
    summary["ok"] = all(checks.values())
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"## Soak: {summary['steps']} Bi-Drop steps, ZeRO-{summary['stage']} fp32, {summary['ranks']} ranks, "
             f"k={summary['k']} p={summary['p']}",
             "",
             f"{summary['seconds']:.1f} s ({summary['median_step_s'] * 1000:.1f} ms median step, "
             f"{summary['max_step_s'] * 1000:.0f} ms slowest); a NaN pass every {summary['fault_every']} steps: "
             f"{summary['skips_expected']} skips expected, seen per rank {summary['skips_seen_per_rank']}; "
             f"then faults in a row: SkipLimitError (max_consecutive_skips={summary['max_consecutive_skips']}) "
             f"after {summary['skip_limit_raised_after_burst_steps_per_rank']} of them per rank",
             "",
             "| rank | RSS first MiB | last MiB | max MiB | min MiB | drift | samples |",
             "|---|---|---|---|---|---|---|"]
    for row in summary["rss_after_warmup"]:
        lines.append(f"| {row['rank']} | {row['first_mib']:.1f} | {row['last_mib']:.1f} | {row['max_mib']:.1f} | "
                     f"{row['min_mib']:.1f} | {row['drift']:+.2%} | {row['samples']} |")
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {name} | {'ok' if ok else 'FAILED'} |" for name, ok in summary["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        init_distributed(args.local_rank, args.dist_timeout)
        rank = dist.get_rank()
        with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
            # rank 0's folder for everyone (the ranks share this machine's filesystem)
            where = [args.checkpoint_dir or scratch]
            dist.broadcast_object_list(where, src=0)
            record = soak(args, Path(where[0]))
            records = [None] * dist.get_world_size()
            dist.all_gather_object(records, record)
            dist.barrier()  # no rank removes its temporary folder while another still reads
        close_process_group()
    except RuntimeError as err:
        message = lost_contact_message(err, program="soak.py")
        if message is None:
            raise
        abandon_distributed()
        raise SystemExit(message) from None
    summary = judge(records, args)
    if rank == 0:
        print(markdown(summary), flush=True)
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        command = "torchrun --standalone --nproc_per_node 2 benchmarks/soak.py " + " ".join(sys.argv[1:])
        Path(args.output_json).write_text(json.dumps({**summary, "command": command.strip()}, indent=2) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
