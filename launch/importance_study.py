"""Does the per-pass stability Bi-Drop ranks by track real importance? Per layer, the Spearman
correlation between each eligible element's mean Bi-Drop score over training and
  (a) its Fisher information (the mean squared batch gradient over the same training steps), and
  (b) |theta_T - theta_0| of a vanilla run from the same initialisation on the same batches.

One process. A Bi-Drop run (finetune.py's model, data and optimizer) is driven through the public
hooks, summing each step's scores and squared mean gradients (two extra fp32 buffers over the
eligible elements); then a vanilla run from the same start gives theta_T - theta_0. Writes
OUT/importance.json, OUT/importance.md and OUT/importance.png (bars per layer).

    python launch/importance_study.py --out results/importance -- --train_size 1000 --epochs 1
Arguments after `--` are finetune.py's (task, model, sizes, lr, Bi-Drop settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bidrop_ds import BiDrop, BiDropConfig  # noqa: E402
from bidrop_ds.bidrop import layer_of  # noqa: E402
from bidrop_ds.core import PassStatistics, scores_into_m2  # noqa: E402
from bidrop_ds.data import collator, load_task, tokenize  # noqa: E402
from bidrop_ds.data.glue import spearman  # noqa: E402
from bidrop_ds.models import adamw, default_model_path, load_tokenizer  # noqa: E402
from bidrop_ds.recipes.finetune import build_model, parse_args  # noqa: E402  (the finetune recipe's model and flags)
from bidrop_ds.training.loaders import make_loaders, subset  # noqa: E402


def prepare(args: argparse.Namespace):
    """(model, train loader) of the finetune recipe's settings, the model seeded by --train_seed."""
    task = load_task(args.task, args.glue_dir, bad_rows=args.bad_rows)
    train_split = subset(task.train, args.train_size)
    path = args.model or default_model_path()
    tokenizer = load_tokenizer(path)
    torch.manual_seed(args.train_seed)
    model = build_model(path, task.spec, tokenizer, args.model_dropout)
    encoded = tokenize(datasets.DatasetDict(train=train_split, eval=train_split.select([0])), tokenizer,
                       task.spec.text_columns, args.max_length)
    loader, _ = make_loaders(encoded, collator(tokenizer), args.batch_size, args.train_seed)
    return model, loader


def bidrop_run(args: argparse.Namespace,
               config: BiDropConfig) -> tuple[list[tuple[str, int]], torch.Tensor, torch.Tensor]:
    """((name, numel) of the eligible parameters, mean score per element, mean squared batch gradient)."""
    model, loader = prepare(args)
    model.train()
    optimizer = adamw(model, args.lr, args.weight_decay)
    steps = args.epochs * len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * steps), steps)
    bidrop = BiDrop(model, optimizer, config)
    score_sum = torch.zeros_like(bidrop.stats.mean)
    fisher_sum = torch.zeros_like(bidrop.stats.mean)
    counted = 0
    for _ in tqdm(range(args.epochs), desc="bidrop epochs", leave=False):
        for batch in tqdm(loader, desc="bidrop", unit="step", leave=False):
            bidrop.begin_step()
            for j in range(config.k):
                with bidrop.pass_rng(j), bidrop.micro_step(True, j == config.k - 1):
                    model(**batch).loss.backward()
                bidrop.fold_pass()
            bidrop.stats.fold_last()  # the mean and M2 of all k passes (the last is otherwise held in place)
            step_scores = scores_of(bidrop, config)  # before apply_mask consumes the statistics
            fisher_sum.addcmul_(bidrop.stats.mean, bidrop.stats.mean)  # the batch gradient, before masking
            result = bidrop.apply_mask()
            if not result.skipped:
                score_sum += step_scores
                counted += 1
                optimizer.step()
            scheduler.step()
    eligible = [(piece.name, piece.numel) for piece in bidrop.backend.parameter_slices()]
    return eligible, score_sum / counted, fisher_sum / counted


def scores_of(bidrop: BiDrop, config: BiDropConfig) -> torch.Tensor:
    """This step's Bi-Drop scores, computed on a copy of the folded statistics (the step's own
    computation writes them into its statistics and consumes them while masking)."""
    copy = PassStatistics(bidrop.stats.mean.numel())
    copy.mean.copy_(bidrop.stats.mean)
    copy.m2.copy_(bidrop.stats.m2)
    copy.count = bidrop.stats.count
    return scores_into_m2(copy, bidrop.backend.abs_params(), config.score, config.eps)


def vanilla_displacement(args: argparse.Namespace, config: BiDropConfig, names: list[str]) -> torch.Tensor:
    """|theta_T - theta_0| over the eligible elements (in `names` order) of a vanilla run."""
    model, loader = prepare(args)
    model.train()
    params = dict(model.named_parameters())
    start = torch.cat([params[name].detach().reshape(-1).clone() for name in names])
    optimizer = adamw(model, args.lr, args.weight_decay)
    bidrop = BiDrop(model, optimizer, dataclasses.replace(config, strategy="vanilla", k=1))
    steps = args.epochs * len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * steps), steps)
    for _ in range(args.epochs):
        for batch in tqdm(loader, desc="vanilla", unit="step", leave=False):
            bidrop.step(batch)
            scheduler.step()
    return (torch.cat([params[name].detach().reshape(-1) for name in names]) - start).abs()


def per_layer(eligible: list[tuple[str, int]], score: torch.Tensor, fisher: torch.Tensor,
              moved: torch.Tensor) -> list[dict[str, Any]]:
    """Spearman rho per layer: score vs Fisher, score vs |theta_T - theta_0|."""
    layers: dict[str, list[slice]] = {}
    offset = 0
    for name, numel in eligible:
        layers.setdefault(layer_of(name), []).append(slice(offset, offset + numel))
        offset += numel
    rows = []
    for layer, pieces in layers.items():
        def take(values: torch.Tensor) -> np.ndarray:
            return torch.cat([values[piece] for piece in pieces]).double().numpy()

        s = take(score)
        rows.append({"layer": layer, "elements": int(s.size), "spearman_fisher": spearman(s, take(fisher)),
                     "spearman_displacement": spearman(s, take(moved))})
    return rows


def write_outputs(rows: list[dict[str, Any]], out: Path, command_line: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| layer | elements | rho(score, Fisher) | rho(score, abs(theta_T - theta_0) vanilla) |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['elements']:,} | {r['spearman_fisher']:.3f} | {r['spearman_displacement']:.3f} |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    (out / "importance.md").write_text(f"# Bi-Drop score vs importance, Spearman per layer\n\n{table}\n"
                                       f"Command: `{command_line}`\n", encoding="utf-8")
    (out / "importance.json").write_text(json.dumps({"rows": rows, "command": command_line}, indent=2) + "\n",
                                         encoding="utf-8")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(rows)), 3.8))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["spearman_fisher"] for r in rows], 0.4, label="vs Fisher information")
    ax.bar(x + 0.2, [r["spearman_displacement"] for r in rows], 0.4, label="vs |θ_T − θ_0| (vanilla)")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, [r["layer"] for r in rows])
    ax.set_ylabel("Spearman ρ with the mean Bi-Drop score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "importance.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for importance.json/.md/.png")
    out = Path(parser.parse_args(own).out)
    args = parse_args(rest)
    if args.deepspeed:
        raise SystemExit("importance_study.py runs in one process; drop --deepspeed")
    config = BiDropConfig.from_args(args)
    if config.strategy != "bidrop" or not config.masking:
        raise SystemExit(f"importance_study.py studies Bi-Drop's scores: needs strategy bidrop with k > 1 and "
                         f"p < 1, got {config.strategy} k={config.k} p={config.p}")
    out.mkdir(parents=True, exist_ok=True)
    eligible, score, fisher = bidrop_run(args, config)
    moved = vanilla_displacement(args, config, [name for name, _ in eligible])
    rows = per_layer(eligible, score, fisher, moved)
    print(write_outputs(rows, out, "python launch/importance_study.py " + " ".join(argv)), flush=True)
    return {"rows": rows}


if __name__ == "__main__":
    main()
