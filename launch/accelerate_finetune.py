r"""Bi-Drop fine-tuning under Hugging Face accelerate (DeepSpeed ZeRO, FSDP2, DDP or one process).

    accelerate launch --config_file ds_configs/accelerate_zero2.yaml launch/accelerate_finetune.py
    accelerate launch --config_file ds_configs/accelerate_zero3.yaml --mixed_precision bf16 \
        launch/accelerate_finetune.py
    accelerate launch --config_file ds_configs/accelerate_fsdp2.yaml launch/accelerate_finetune.py --chunks 2  # GPUs
    accelerate launch --multi_gpu --num_processes 2 launch/accelerate_finetune.py --chunks 2                   # DDP
    python launch/accelerate_finetune.py                                                      # one process

On a CPU-only machine put `DS_ACCELERATOR=cpu OMP_NUM_THREADS=1` in front of `accelerate launch`; the
script then hands `InitProcessGroupKwargs(backend="gloo")` to the Accelerator of a DeepSpeed run
(accelerate's DeepSpeed setup does not pick gloo on CPU by itself). DDP on CPU needs
`ACCELERATE_USE_CPU=1` with `--multi_gpu` (`--cpu --num_processes 2` starts one process). The FSDP2
yaml needs GPUs: on CPU accelerate attaches no FSDP plugin and runs DDP.

The loop: `accelerator.prepare(model, optimizer, loader, scheduler)`, `bidrop_for(...)`, then one
`bidrop.step(chunks)` per `chunks` consecutive micro-batches of the prepared loader (the loader's
batch size is the micro batch; under DeepSpeed the yaml's `gradient_accumulation_steps` is the chunk
count), then `scheduler.step()`. accelerate's `backward()` is never called: Bi-Drop drives the k passes
(and under DeepSpeed the engine) itself. The LR scheduler (linear warm-up and decay) is a torch
LambdaLR, which accelerate wraps in an AcceleratedScheduler (also under DeepSpeed, which only owns
schedulers of its own kind); with `step_scheduler_with_optimizer=False` that wrapper steps it exactly
once per call, i.e. once per Bi-Drop step.

Data: by default a synthetic, learnable token task (label = which of two token pools most of the
sequence is drawn from) on a tiny config-built BERT, < 1 minute on 2 CPU cores. `--data vader` uses
the offline movie-snippet sentiment set (`bidrop_ds.data`, fetched with pip the first time) and the
offline all-MiniLM-L6-v2 (`--train_size 1024` on 2 CPU processes: ~100 s); `--tiny` keeps its
tokenizer but trains a tiny random-init BERT instead (a smoke test of the data path: it does not
learn real text in one epoch).

At the end rank 0 prints `loss first=... last=... went_down=True|False`: the training loss (mean over
ranks) averaged over the first and the last `--window` steps; the exit status is 0 either way unless
--require_decrease is given. `--output_json` writes a summary (rank 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from bidrop_ds import BiDropConfig
from bidrop_ds.config import add_config_arguments
from bidrop_ds.integrations.accelerate import bidrop_for, chunks_per_step, micro_batch_groups
from bidrop_ds.models import adamw, default_model_path

SYNTH_VOCAB = 128
SYNTH_POOLS = ((5, 60), (60, 115))  # token ids [lo, hi) of the negative and the positive pool


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", choices=("synthetic", "vader"), default="synthetic",
                        help="synthetic token task, or the offline VADER movie-snippet sentiment set")
    parser.add_argument("--model", default=None,
                        help="a local HF model folder (classifier weights + tokenizer); default: a tiny "
                             "config-built BERT (synthetic) or the offline all-MiniLM-L6-v2 (vader)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --data vader: the MiniLM tokenizer but a tiny random-init BERT (smoke test)")
    parser.add_argument("--train_size", type=int, default=1024, help="training examples (0: all, vader)")
    parser.add_argument("--micro_batch", type=int, default=8, help="examples per micro-batch per process")
    parser.add_argument("--chunks", type=int, default=None,
                        help="micro-batches per Bi-Drop step (default: accelerate's gradient_accumulation_steps, "
                             "which under DeepSpeed must be this number)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="peak LR (default 2e-3 tiny BERT, 1e-4 MiniLM)")
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--train_seed", type=int, default=0, help="model init, data and shuffling")
    parser.add_argument("--window", type=int, default=3, help="steps averaged for the first/last loss")
    parser.add_argument("--log_every", type=int, default=5)
    parser.add_argument("--require_decrease", action="store_true", help="exit 1 unless the loss went down")
    parser.add_argument("--output_json", default=None, help="summary file (rank 0)")
    add_config_arguments(parser)
    return parser.parse_args(argv)


# ----- data and model --------------------------------------------------------------------------------
class SyntheticTokens(Dataset):
    """[CLS] + tokens, 80% of them from the label's pool, the rest from the other pool or noise."""

    def __init__(self, size: int, length: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (size,), generator=g)
        length = max(4, length)
        own = torch.stack([torch.randint(*SYNTH_POOLS[int(label)], (length - 1,), generator=g)
                           for label in self.labels])
        other = torch.randint(SYNTH_POOLS[0][0], SYNTH_POOLS[1][1], (size, length - 1), generator=g)
        tokens = torch.where(torch.rand(size, length - 1, generator=g) < 0.8, own, other)
        self.input_ids = torch.cat([torch.full((size, 1), 2), tokens], dim=1)  # 2 = [CLS] here

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones_like(self.input_ids[i]),
                "labels": self.labels[i]}


def tiny_bert(vocab_size: int, max_length: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=max(64, max_length), num_labels=2)
    return BertForSequenceClassification(config)


def offline_minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 folder; without its package, one line naming the pip command."""
    try:
        return default_model_path()
    except OSError as err:
        raise SystemExit(f"accelerate_finetune.py: error: --data vader: {err}") from None


def build(args: argparse.Namespace, accelerator) -> tuple[torch.nn.Module, Dataset, Any]:
    """(model, train dataset, collate_fn or None)."""
    if args.data == "synthetic":
        if args.model:
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
        else:
            model = tiny_bert(SYNTH_VOCAB, args.max_length, args.train_seed)
        vocab = model.config.vocab_size
        if vocab < SYNTH_POOLS[1][1]:
            raise SystemExit(f"--data synthetic needs a vocabulary of >= {SYNTH_POOLS[1][1]} tokens; {vocab}")
        return model, SyntheticTokens(args.train_size or 1024, args.max_length, args.train_seed), None

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bidrop_ds.data import collator, sentiment_splits, tokenize

    path = args.model or offline_minilm_path()
    with accelerator.main_process_first():  # rank 0 fetches/extracts the VADER files first
        splits = sentiment_splits("movie")
    train = splits["train"]
    if args.train_size and args.train_size < len(train):
        train = train.shuffle(seed=args.train_seed).select(range(args.train_size))
    tokenizer = AutoTokenizer.from_pretrained(path)
    import datasets

    encoded = tokenize(datasets.DatasetDict({"train": train}), tokenizer, ["text"], args.max_length)["train"]
    if args.tiny:
        model = tiny_bert(tokenizer.vocab_size, args.max_length, args.train_seed)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, ignore_mismatched_sizes=True)
    return model, encoded, collator(tokenizer)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----- the run ---------------------------------------------------------------------------------------
def make_accelerator():
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate's DeepSpeed setup picks no CPU backend by itself: gloo on a machine without a GPU.
    # (Only for launched DeepSpeed runs: an explicit backend in a plain `python` run makes accelerate
    # look for a process group.)
    launched_deepspeed = (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
                          and int(os.environ.get("LOCAL_RANK", -1)) != -1)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched_deepspeed and not torch.cuda.is_available() else []
    # step_scheduler_with_optimizer=False: the AcceleratedScheduler steps the LR schedule once per
    # scheduler.step() call (not num_processes times), i.e. once per Bi-Drop step.
    return Accelerator(kwargs_handlers=handlers, step_scheduler_with_optimizer=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = BiDropConfig.from_args(args)
    accelerator = make_accelerator()
    started = time.perf_counter()
    world = accelerator.num_processes
    chunks = args.chunks if args.chunks is not None else chunks_per_step(accelerator)
    if accelerator.state.deepspeed_plugin is not None and chunks != accelerator.gradient_accumulation_steps:
        raise SystemExit(f"--chunks {chunks} but the DeepSpeed config has gradient_accumulation_steps="
                         f"{accelerator.gradient_accumulation_steps}; they must be equal (drop --chunks, or change "
                         "gradient_accumulation_steps in the accelerate config)")

    model, train_set, collate = build(args, accelerator)
    lr = args.lr if args.lr is not None else (2e-3 if args.data == "synthetic" or args.tiny else 1e-4)
    loader = DataLoader(train_set, batch_size=args.micro_batch, shuffle=True, drop_last=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(args.train_seed))
    # Every rank reads the same number of micro-batches: its share of the full ones, in whole steps.
    per_rank = len(loader) // world
    steps_per_epoch = per_rank // chunks
    total_steps = steps_per_epoch * args.epochs
    if total_steps == 0:
        raise SystemExit(f"{len(train_set)} examples make no Bi-Drop step of {chunks} micro-batches of "
                         f"{args.micro_batch} on {world} process(es); raise --train_size")
    optimizer = adamw(model, lr, args.weight_decay)
    scheduler = linear_schedule(optimizer, math.floor(args.warmup * total_steps), total_steps)

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    bidrop = bidrop_for(accelerator, model, optimizer, config)
    if accelerator.is_main_process:
        print(f"accelerate: {accelerator.distributed_type} processes={world} mixed_precision="
              f"{accelerator.mixed_precision} backend={type(bidrop.backend).__name__} chunks={chunks} "
              f"micro_batch={args.micro_batch} steps={total_steps} | {json.dumps(config.to_dict())}", flush=True)

    losses, kept, skipped = [], [], 0
    model.train()
    for epoch in range(args.epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for chunk_list in micro_batch_groups(loader, chunks, limit=steps_per_epoch * chunks):
            result = bidrop.step(chunk_list)
            scheduler.step()
            loss = accelerator.reduce(torch.tensor(result.loss, device=accelerator.device), "mean").item()
            losses.append(loss)
            skipped += result.skipped
            if not result.skipped:
                kept.append(result.kept_fraction)
            step = len(losses)
            if accelerator.is_main_process and (step % args.log_every == 0 or step == 1 or step == total_steps):
                print(f"step {step}/{total_steps} epoch {epoch + 1} loss {loss:.4f} kept {result.kept_fraction:.3f} "
                      f"lr {scheduler.get_last_lr()[0]:.2e}", flush=True)

    window = max(1, min(args.window, len(losses) // 2))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    went_down = last < first
    summary = {"distributed_type": accelerator.distributed_type.value, "processes": world,
               "mixed_precision": accelerator.mixed_precision, "backend": type(bidrop.backend).__name__,
               "zero_stage": getattr(bidrop.backend, "stage", None), "chunks": chunks,
               "micro_batch": args.micro_batch, "batch_per_step": args.micro_batch * chunks * world,
               "steps": len(losses), "lr_scheduler_steps": scheduler.scheduler.last_epoch,
               "final_lr": scheduler.get_last_lr()[0], "skipped_steps": skipped,
               # the LR the optimizer that steps holds (under DeepSpeed: the ZeRO optimizer's groups)
               "final_optimizer_lr": optimizer.param_groups[0]["lr"],
               "mean_kept_fraction": sum(kept) / max(1, len(kept)), "losses": losses, "loss_first": first,
               "loss_last": last, "loss_window": window, "went_down": went_down,
               "seconds": time.perf_counter() - started, "bidrop": config.to_dict()}
    if accelerator.is_main_process:
        print(f"loss first={first:.4f} last={last:.4f} (mean of {window} steps) went_down={went_down} "
              f"skipped={skipped} kept={summary['mean_kept_fraction']:.3f} time={summary['seconds']:.1f}s", flush=True)
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(summary, indent=2))

    # A clean exit of gloo runs: destroy the engine, drop every reference, collect, meet, then close.
    del bidrop, model, optimizer, scheduler, loader
    accelerator.free_memory()  # destroys the DeepSpeed engine, if any
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group
    return 0 if went_down or not args.require_decrease else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
