"""Step time of a Bi-Drop step against k vanilla steps, side by side on the same DeepSpeed engine.

Run on 2 CPU ranks (a config-built BERT big enough that compute dominates):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/step_time.py --stage 2

Each repeat times one vanilla step (forward, engine.backward, engine.step) and one Bi-Drop step
on the same batch, interleaved after a warm-up, and reports the median of
Bi-Drop / (k x vanilla), the plugin's own per-rank buffers against 8 bytes per owned element,
and the process peak RSS. It prints a Markdown table (rank 0) and can write JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification

from bidrop_ds import BiDrop, BiDropConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    return parser.parse_args()


def build_engine(args: argparse.Namespace):
    import deepspeed

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=8192, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
        max_position_embeddings=max(128, args.seq_len), num_labels=2))
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "train_batch_size": args.micro_batch * dist.get_world_size(), "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.stage}, "bf16": {"enabled": args.bf16},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if args.bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
                                      config=config)
    return engine


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    engine = build_engine(args)
    bidrop = BiDrop(engine, config=BiDropConfig(k=args.k, p=args.p, seed=0))
    g = torch.Generator().manual_seed(dist.get_rank())
    batch = {"input_ids": torch.randint(0, 8192, (args.micro_batch, args.seq_len), generator=g).to(engine.device),
             "labels": torch.randint(0, 2, (args.micro_batch,), generator=g).to(engine.device)}

    def vanilla() -> None:
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(engine(**batch).loss)
        engine.step()

    ratios, vanilla_s, bidrop_s = [], [], []
    for repeat in range(args.warmup + args.repeats):
        v = timed(vanilla)
        b = timed(lambda: bidrop.step(batch))
        if repeat >= args.warmup:
            vanilla_s.append(v)
            bidrop_s.append(b)
            ratios.append(b / (args.k * v))
    plugin_bytes = bidrop.stats.mean.nbytes + bidrop.stats.m2.nbytes
    row = {
        "stage": args.stage, "dtype": "bf16" if args.bf16 else "fp32", "k": args.k, "ranks": dist.get_world_size(),
        "params": sum(p.numel() for p in engine.module.parameters()) if args.stage < 3 else None,
        "owned_elements": bidrop.backend.numel, "vanilla_step_s": statistics.median(vanilla_s),
        "bidrop_step_s": statistics.median(bidrop_s), "step_time_ratio": statistics.median(ratios),
        "plugin_bytes_per_rank": plugin_bytes, "bound_bytes_per_rank": 8 * bidrop.backend.numel,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if dist.get_rank() == 0:
        print("| " + " | ".join(row) + " |")
        print("|" + "---|" * len(row))
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
        if args.output_json:
            with open(args.output_json, "w", encoding="utf-8") as handle:
                json.dump({**row, "command": "torchrun --nproc_per_node 2 benchmarks/step_time.py " +
                           " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "local_rank")}, handle, indent=2)
    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
