"""Per-rank memory of vanilla and Bi-Drop fine-tuning under ZeRO-2, ZeRO-3 and ZeRO-3 + offload,
measured on a config-built Llama-style classifier, and the per-GPU model-state memory that follows
for 7B / 13B / 70B models on 8 and 64 GPUs.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/memory_scale.py            # ~341M parameters
    python benchmarks/memory_scale.py --layers 2 --hidden 128 --steps 1               # a quick look
    python benchmarks/memory_scale.py --from_results benchmarks/results/memory_scale.json  # reprint, no job

Each (setup, mode) runs as its own 2-rank torchrun job (bf16, fp32 gradient accumulation, k = 2,
p = 0.3; --one_launch: all of them in turn in one job, as the test suite does): the model is built
(inside zero.Init under ZeRO-3), a few steps run, and each rank
reports its peak RSS and the bytes of each part of the model state it holds, read off the tensors
themselves: the bf16 parameters, the fp32 master weights, the gradient partition, the optimizer
state (Adam's two moments) and Bi-Drop's own buffers (`BiDrop.memory_bytes()`). Each part is
printed as bytes per model element (x ranks for the partitioned parts), and the projection
    per-GPU bytes = P x (b_param / s_param + b_grad / s_grad + b_master / N + b_adam / N)
                    + P_eligible x b_bidrop / N
(s_param = 1 under ZeRO-2, N under ZeRO-3; s_grad = N; offload moves b_grad, b_master, b_adam and
b_bidrop to host memory, and offload_param also b_param) is filled in with the measured b's.
With LoRA (rank --lora_r on q_proj and v_proj, the Llama shapes in LLAMA_SHAPES) the frozen base
costs P x b_param / s_param, the L LoRA elements the full formula, and Bi-Drop's extra is
L x b_bidrop / N: 4 bytes per LoRA element a rank owns (benchmarks/step_time.py --model llama
--lora 16 measures exactly that on a 2-rank ZeRO-3 run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETUPS = {  # name -> zero_optimization section
    "zero2": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
    "zero3": {"stage": 3, "contiguous_gradients": True, "stage3_param_persistence_threshold": 0},
    "zero3+offload": {"stage": 3, "contiguous_gradients": True, "stage3_param_persistence_threshold": 0,
                      "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
}
MODELS = {"7B": (6.74e9, 0.96), "13B": (13.0e9, 0.97), "70B": (69.0e9, 0.98)}  # params, eligible fraction
# Llama-2 shapes: (layers, hidden, v_proj output width: grouped-query attention makes 70B's 8 x 128)
LLAMA_SHAPES = {"7B": (32, 4096, 4096), "13B": (40, 5120, 5120), "70B": (80, 8192, 1024)}
GPUS = (8, 64)
MICRO, LENGTH = 2, 32
# ZeRO-2 builds its fp32 gradient partition at the step's last backward and frees it in the step,
# so the reading after the steps finds none: the projection then counts 4 bytes (fp32 accumulation).
FP32_GRAD = 4.0


def ds_config(setup: str, world: int) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO * world, "gradient_clipping": 1.0, "steps_per_print": 10**9,
            "zero_optimization": dict(SETUPS[setup]), "bf16": {"enabled": True},
            "data_types": {"grad_accum_dtype": "fp32"}, "zero_allow_untested_optimizer": True,
            "wall_clock_breakdown": False}


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for tensor in tensors:
        if tensor is None or not tensor.numel():
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def job_file(folder: Path, job: str) -> Path:
    """Where the rows of job "setup/mode" are written."""
    return folder / f"{job.replace('/', '-')}.json"


def worker(args: argparse.Namespace) -> None:
    """One rank of a job: for each of its (setup, mode) pairs in turn, build, train a few steps and
    report memory as JSON in --out (the peak RSS mark is reset before each pair)."""
    import torch
    import torch.distributed as dist

    from benchmarks.rss import reset_peak_rss
    from bidrop_ds.comm import close_process_group

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for job in args.jobs:
        args.setup, args.mode = job.split("/")
        reset_peak_rss()
        row = measure(args)  # destroys its engine; its references die on return
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        if dist.get_rank() == 0:
            job_file(Path(args.out), job).write_text(json.dumps(rows))
    close_process_group()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """This rank's memory row of the job: build the model and engine, train a few steps, read the bytes."""
    import torch
    import torch.distributed as dist
    import deepspeed
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from benchmarks.rss import status_kib
    from bidrop_ds import BiDrop, BiDropConfig
    from bidrop_ds.models import adamw, held_elements, zero3_init

    rank, world = dist.get_rank(), dist.get_world_size()
    config = ds_config(args.setup, world)
    offload = "offload_optimizer" in config["zero_optimization"]
    model_config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_hidden_layers=args.layers, num_attention_heads=args.heads,
                               num_key_value_heads=args.heads, attention_dropout=0.1, pad_token_id=0, num_labels=2)
    torch.manual_seed(0)
    with zero3_init(config):
        model = AutoModelForSequenceClassification.from_config(model_config, dtype=torch.bfloat16).train()
    held, total = held_elements(model)
    built_kib = status_kib("VmHWM")
    optimizer = adamw(model, 1e-5, 0.0, host_offload=offload)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    bidrop = BiDrop(engine, config=BiDropConfig(k=2 if args.mode == "bidrop" else 1, p=0.3, seed=1))
    generator = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        batch = {"input_ids": torch.randint(1, args.vocab, (MICRO, LENGTH), generator=generator),
                 "labels": torch.randint(0, 2, (MICRO,), generator=generator)}
        bidrop.step(batch)
    opt = engine.optimizer
    seen: set = set()
    params = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in engine.module.parameters()]
    masters = list(getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat)
    state = [value for per_param in opt.optimizer.state.values() for value in per_param.values()
             if isinstance(value, torch.Tensor) and value.numel() > 1]
    grads = [getattr(opt, "grad_partitions_flat_buffer", None)] + [m.grad for m in masters]
    grads += [getattr(listed, "flat_partition", None) for listed in getattr(opt, "averaged_gradients", {}).values()]
    row = {"setup": args.setup, "mode": args.mode, "rank": rank, "world": world, "model_elements": total,
           "eligible_elements_owned": bidrop.backend.numel, "held_param_elements": held,
           "peak_rss_bytes": status_kib("VmHWM") * 1024, "construction_peak_rss_bytes": built_kib * 1024,
           "param_bytes": _storage_bytes(params, seen), "master_bytes": _storage_bytes(masters, seen),
           "optimizer_bytes": _storage_bytes(state, seen), "grad_bytes": _storage_bytes(grads, seen),
           "bidrop_bytes": bidrop.memory_bytes(), "statistics_device": str(bidrop.stats.device)}
    engine.destroy()
    return row


def run_job(args: argparse.Namespace, jobs: list[str], out: Path) -> None:
    """One 2-rank torchrun job that measures each "setup/mode" of `jobs` in turn, into `out`/setup-mode.json."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--worker", "--jobs", *jobs, "--out", str(out),
               "--layers", str(args.layers), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
               "--heads", str(args.heads), "--vocab", str(args.vocab), "--steps", str(args.steps)]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    print(f"[{' '.join(jobs)}] running ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"memory_scale.py: the {' '.join(jobs)} job failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")


def per_element(rows: list[dict]) -> dict[str, float]:
    """Measured bytes per model element of each part (summed over the ranks: the whole model's)."""
    total, eligible = rows[0]["model_elements"], sum(r["eligible_elements_owned"] for r in rows)
    out = {part: sum(r[f"{part}_bytes"] for r in rows) / total for part in ("master", "grad", "optimizer")}
    out["param"] = rows[0]["param_bytes"] / rows[0]["held_param_elements"]  # per element held (replicated or not)
    out["bidrop_per_eligible"] = sum(r["bidrop_bytes"] for r in rows) / max(eligible, 1)
    return out


def lora_elements(model: str, rank: int) -> int:
    """LoRA elements of rank `rank` on q_proj and v_proj: per layer A (r x hidden) and B (out x r) of each."""
    layers, hidden, v_out = LLAMA_SHAPES[model]
    return layers * rank * ((hidden + hidden) + (hidden + v_out))


def projection(measured: dict[str, dict[str, float]], lora_r: int = 16) -> list[str]:
    """Per-GPU model-state memory for 7B/13B/70B on 8/64 GPUs from the measured bytes per element:
    full fine-tuning (GiB) and LoRA of rank `lora_r` on q/v (GiB; Bi-Drop's extra in MiB)."""
    lines = [f"| model | GPUs | setup | vanilla GiB/GPU | Bi-Drop GiB/GPU | Bi-Drop extra | LoRA r={lora_r} elements "
             "| LoRA vanilla GiB/GPU | LoRA Bi-Drop extra MiB/GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (params, eligible_fraction) in MODELS.items():
        lora = lora_elements(name, lora_r)
        for gpus in GPUS:
            for setup, b in measured.items():
                stage3 = setup.startswith("zero3")
                offload = "offload" in setup
                param = b["param"] / (gpus if stage3 else 1) * (0 if offload else 1)
                grad = b["grad"] or FP32_GRAD  # ZeRO-2's partition is freed by the step (see per_element)
                device_state = 0.0 if offload else (grad + b["master"] + b["optimizer"]) / gpus
                vanilla = params * (param + device_state)
                extra = 0.0 if offload else params * eligible_fraction * b["bidrop_per_eligible"] / gpus
                lora_vanilla = params * param + lora * (param + device_state)  # the base is frozen: parameters only
                lora_extra = 0.0 if offload else lora * b["bidrop_per_eligible"] / gpus
                lines.append(f"| {name} | {gpus} | {setup} | {vanilla / 2**30:.1f} | {(vanilla + extra) / 2**30:.1f} "
                             f"| {extra / 2**30:.2f} | {lora / 1e6:.1f}M | {lora_vanilla / 2**30:.2f} "
                             f"| {lora_extra / 2**20:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", nargs="+", default=[], help=argparse.SUPPRESS)  # the worker's setup/mode pairs
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=list(SETUPS))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    parser.add_argument("--one_launch", action="store_true",
                        help="measure every (setup, mode) in turn in one 2-rank job: quicker, but a peak RSS then "
                             "includes what the earlier ones left allocated (the bytes per element do not change)")
    parser.add_argument("--output_json", default=None,
                        help="default: benchmarks/results/memory_scale.json "
                             "(memory_projection.json with --from_results)")
    parser.add_argument("--jobs_dir", default=None,
                        help="keep each job's JSON here; jobs already there are not rerun")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank of the projection's LoRA columns")
    parser.add_argument("--from_results", default=None, metavar="JSON",
                        help="print the tables and the projection from a previous --output_json (no job runs)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results, measured = {}, {}
    if args.from_results:
        previous = json.loads(Path(args.from_results).read_text())
        results = previous["results"]
        args.setups = list(dict.fromkeys(key.split("/")[0] for key in results))
    with tempfile.TemporaryDirectory() as tmp:
        jobs = Path(args.jobs_dir or tmp)
        jobs.mkdir(parents=True, exist_ok=True)
        wanted = [] if args.from_results else [f"{setup}/{mode}" for setup in args.setups
                                               for mode in ("vanilla", "bidrop")]
        pending = [job for job in wanted if not job_file(jobs, job).exists()]
        for batch in [pending] if args.one_launch and pending else [[job] for job in pending]:
            run_job(args, batch, jobs)
        for job in wanted:
            results[job] = json.loads(job_file(jobs, job).read_text())
    print("\nBytes per model element (params: per element a rank holds; the others: summed over the ranks)")
    print("\n| setup | mode | peak RSS per rank MiB | params | fp32 master | grads | Adam | Bi-Drop B/eligible "
          "| stats on |\n|---|---|---|---|---|---|---|---|---|")
    for key, rows in results.items():
        setup, mode = key.split("/")
        b = per_element(rows)
        if mode == "bidrop":
            measured[setup] = b
        peak = max(r["peak_rss_bytes"] for r in rows) / 2**20
        print(f"| {setup} | {mode} | {peak:.0f} | {b['param']:.2f} | {b['master']:.2f} | {b['grad']:.2f} | "
              f"{b['optimizer']:.2f} | {b['bidrop_per_eligible']:.2f} | {rows[0]['statistics_device']} |")
    for setup in args.setups:
        vanilla, bidrop = results[f"{setup}/vanilla"], results[f"{setup}/bidrop"]
        extra = max(b["peak_rss_bytes"] - v["peak_rss_bytes"] for v, b in zip(vanilla, bidrop))
        bound = max(4 * b["eligible_elements_owned"] for b in bidrop)
        print(f"{setup}: Bi-Drop peak RSS over vanilla, worst rank: {extra / 2**20:.1f} MiB "
              f"(4 x eligible elements owned = {bound / 2**20:.1f} MiB)")
    print("\nProjected per-GPU model-state memory (parameters, gradients, optimizer state, Bi-Drop; "
          "activations excluded):")
    table = projection(measured, args.lora_r)
    print("\n".join(table))
    name = "memory_projection.json" if args.from_results else "memory_scale.json"
    args.output_json = args.output_json or str(ROOT / "benchmarks" / "results" / name)
    command = "python benchmarks/memory_scale.py " + " ".join(sys.argv[1:])
    Path(args.output_json).write_text(json.dumps({"command": command, "args": vars(args), "results": results,
                                                  "bytes_per_element": measured, "projection": table}, indent=1))
    print(f"\nwrote {args.output_json}")


if __name__ == "__main__":
    main()
