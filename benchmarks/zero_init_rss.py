"""Peak RSS per rank while a model is built from a checkpoint on 2 ranks and handed to a ZeRO-3
engine, with and without deepspeed.zero.Init (`bidrop_ds.models.zero3_init`), next to the model's bytes.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/zero_init_rss.py      # Llama shape, 341M parameters

The parent builds a Llama-shaped sequence classifier with random weights from a config (default
24 layers x hidden 1024, MLP 2816, vocabulary 32000: 341M parameters, fp32) and saves it with
`save_pretrained` (safetensors) into a temporary folder. Then, once per mode, `torchrun` starts 2
fresh ranks that each load it with `from_pretrained` (`bidrop_ds.models.load_classifier`), whole or
inside zero.Init, then pass it to `deepspeed.initialize` under ZeRO-3 (parameters only: no optimizer),
and report for each phase the peak RSS (VmHWM, reset before the phase) and the peak anonymous RSS
(RssAnon sampled every 5 ms: memory the process owns, without the pages of the memory-mapped
checkpoint), plus the parameter elements each rank holds after construction.

Loaded whole, the weights stay pages of the memory-mapped safetensors file until something reads
them: construction looks cheap, and the cost shows when the engine partitions them (every rank reads
the whole model). Inside zero.Init each rank allocates only its partition, and rank 0 alone reads the
checkpoint, one gathered layer at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rss import reset_peak_rss, status_kib  # noqa: E402

MIB = 2**20


class AnonPeak:
    """The largest RssAnon of this process, sampled by a thread while the block runs."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak_kib, self._stop = interval_s, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))
            time.sleep(self.interval_s)

    def __enter__(self) -> "AnonPeak":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))


def zero3_config(world: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
            "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}


def worker(folder: str, zero_init: bool, out: str) -> None:
    """One rank: load the classifier from `folder` (inside zero.Init or whole), report its memory."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from bidrop_ds.comm import close_process_group
    from bidrop_ds.models import classifier_config, held_elements, load_classifier, zero3_init

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config, ds_config = classifier_config(folder, num_labels=2), zero3_config(world)
    dist.barrier()
    row = {"rank": rank, "zero_init": zero_init, "rss_before_mib": status_kib("VmRSS") / 1024}

    def phase(name: str):
        assert reset_peak_rss(), "cannot reset VmHWM (/proc/self/clear_refs)"
        return name, time.perf_counter(), AnonPeak()

    def record(name: str, start: float, anon: AnonPeak) -> None:
        row.update({f"{name}_peak_rss_mib": status_kib("VmHWM") / 1024, f"{name}_peak_anon_mib": anon.peak_kib / 1024,
                    f"{name}_seconds": round(time.perf_counter() - start, 1)})

    name, start, anon = phase("construction")
    with anon, zero3_init(ds_config if zero_init else None):
        model = load_classifier(folder, config)
    record(name, start, anon)
    row["held_elements"], row["model_elements"] = held_elements(model)
    name, start, anon = phase("engine")
    with anon:
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    record(name, start, anon)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(rows, handle)
    engine.destroy()
    del engine, model
    close_process_group()


def build_checkpoint(folder: str, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """Save a random-weight Llama-shaped classifier to `folder`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         num_labels=2, pad_token_id=0, attention_dropout=0.1)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--output_json", default="benchmarks/results/zero_init_rss.json")
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "ZERO_INIT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, zero_init, out = args.worker
        worker(folder, zero_init == "1", out)
        return
    with tempfile.TemporaryDirectory(prefix="zero-init-rss-") as tmp:
        params = build_checkpoint(tmp, args.layers, args.hidden, args.intermediate, args.vocab)
        results = {"model": f"Llama-shaped classifier, {args.layers} layers x hidden {args.hidden}, MLP "
                            f"{args.intermediate}, vocabulary {args.vocab}, random weights (fp32 safetensors)",
                   "parameters": params, "model_fp32_mib": 4 * params / MIB, "ranks": args.ranks, "runs": {}}
        for zero_init in (False, True):
            out = os.path.join(tmp, f"rows_{int(zero_init)}.json")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(args.ranks), os.path.abspath(__file__), "--worker", tmp, str(int(zero_init)), out]
            subprocess.run(command, check=True)
            with open(out, encoding="utf-8") as handle:
                results["runs"]["zero_init" if zero_init else "whole"] = json.load(handle)
    print(f"\n{results['model']}: {params / 1e6:.1f}M parameters, {results['model_fp32_mib']:,.0f} MiB in fp32; "
          f"{args.ranks} ranks, from_pretrained\n")
    print("| built | rank | RSS before | from_pretrained: peak RSS / anonymous | elements held after "
          "| deepspeed.initialize: peak RSS / anonymous | seconds |")
    print("|---|---|---|---|---|---|---|")
    for rows in results["runs"].values():
        for row in rows:
            print(f"| {'inside zero.Init' if row['zero_init'] else 'whole'} | {row['rank']} "
                  f"| {row['rss_before_mib']:,.0f} MiB "
                  f"| {row['construction_peak_rss_mib']:,.0f} / {row['construction_peak_anon_mib']:,.0f} MiB "
                  f"| {row['held_elements'] / 1e6:.1f}M of {row['model_elements'] / 1e6:.1f}M "
                  f"| {row['engine_peak_rss_mib']:,.0f} / {row['engine_peak_anon_mib']:,.0f} MiB "
                  f"| {row['construction_seconds']} + {row['engine_seconds']} |")
    os.makedirs(os.path.dirname(args.output_json) or ".", exist_ok=True)
    with open(args.output_json, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
