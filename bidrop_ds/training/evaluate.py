"""Distributed evaluation of a classifier, and choosing the epoch by a dev split.

`evaluate` scores held-out loaders on one process or on every rank (each example exactly once,
metrics on rank 0). `DevSelection` evaluates the dev split after each epoch, the held-out sets only
where they can be reported, and at the end restores the best-dev epoch's parameters when it kept a
host copy of them instead (`held_out_at="end"`). Evaluating draws nothing from the training's random
streams: how often it runs leaves the training alone.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bidrop_ds.data import TaskSpec, compute_metrics
from bidrop_ds.models import host_copy, restore_values
from bidrop_ds.training.dist import gather_to_all, world
from bidrop_ds.training.loop import to_device

DEV = "dev"  # the split name of the dev rows (no task has a held-out set of that name)
HELD_OUT_AT = ("new_best", "end")  # when runs with a dev split evaluate the held-out sets


def evaluate(model: torch.nn.Module, loaders: Mapping[str, DataLoader], spec: TaskSpec,
             device: torch.device | None = None, progress: bool = True) -> dict[str, float]:
    """`evaluate_set` on each held-out set in order, in one dict: the first (headline) set's keys as
    they are (`eval_loss`, `accuracy`, ...), the others' prefixed with the set's name
    (`tweets_eval_loss`, `tweets_accuracy`), so a task with one held-out set keeps the plain keys."""
    results: dict[str, float] = {}
    for position, (name, loader) in enumerate(loaders.items()):
        prefix = f"{name}_" if position else ""
        for key, value in evaluate_set(model, loader, spec, device, progress, name).items():
            results[prefix + key] = value
    return results


@torch.no_grad()
def evaluate_set(model: torch.nn.Module, loader: DataLoader, spec: TaskSpec, device: torch.device | None = None,
                 progress: bool = True, name: str = "eval") -> dict[str, float]:
    """Mean loss and the task's metrics on one held-out loader (dropout off); `name` labels the
    progress bar.

    On several ranks each rank's loader holds its own examples; every rank runs the same number of
    forward calls (ZeRO-3 gathers parameters collectively in each): a rank out of examples runs a
    dummy batch and discards it. Per-example results are gathered to rank 0, which computes the
    metrics over every example exactly once (`eval_examples` counts them); the other ranks return {}."""
    model.eval()
    rank, size = world()
    rounds = len(loader)
    if size > 1:
        most = torch.tensor([rounds], dtype=torch.int64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        rounds = int(most.item())
    batches = iter(loader)
    total_loss, predictions, labels = 0.0, [], []
    for _ in tqdm(range(rounds), desc=name, unit="batch", dynamic_ncols=True, leave=False, disable=not progress):
        batch = next(batches, None)
        real = batch is not None
        if not real:
            batch = loader.collate_fn([loader.dataset[0]])  # keeps the forward calls in step; discarded
        out = model(**to_device(batch, device))
        if not real:
            continue
        total_loss += out.loss.float().item() * len(batch["labels"])
        predictions.append(out.logits.squeeze(-1).float() if spec.is_regression else out.logits.argmax(-1))
        labels.append(batch["labels"])
    local = (total_loss, [t.cpu() for t in predictions], [t.cpu() for t in labels])
    parts = [local]
    if size > 1:
        parts = [None] * size if rank == 0 else None
        dist.gather_object(local, parts, dst=0)
        if rank != 0:
            return {}
    all_predictions = torch.cat([t for _, preds, _ in parts for t in preds])
    all_labels = torch.cat([t for _, _, labs in parts for t in labs])
    metrics = compute_metrics(spec, all_predictions.numpy(), all_labels.numpy())
    return {"eval_loss": sum(part[0] for part in parts) / len(all_labels), **metrics,
            "eval_examples": len(all_labels)}


def best_dev_row(history: Sequence[Mapping[str, float]], metric: str) -> Mapping[str, float]:
    """The epoch row of `history` with the highest dev `metric` (every task metric is better higher);
    the earliest on a tie; a NaN dev score (a constant prediction's correlation) is never best, and
    the last row is taken when every one is NaN."""
    scored = [row for row in history if not math.isnan(row[f"{DEV}_{metric}"])]
    return max(scored, key=lambda row: row[f"{DEV}_{metric}"]) if scored else history[-1]


def held_out_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """The held-out keys of an `epoch_history` row (those of the final evaluation: eval_loss, the
    metrics, eval_examples, and the other sets' prefixed ones), without epoch, train_loss and dev_*."""
    return {key: value for key, value in row.items()
            if key not in ("epoch", "train_loss") and not key.startswith(f"{DEV}_")}


class DevSelection:
    """Choosing the epoch by a dev split, on every rank alike (the rows are rank 0's).

    After each epoch (`end_of_epoch`, the training loop's callback): the dev metrics, and the held-out
    ones where they can be reported: a new best dev score or the last epoch (`held_out_at="new_best"`);
    with `held_out_at="end"` none, a new best's parameters are copied to host memory instead. At the
    end (`finish`): the held-out metrics of the last epoch and of the best-dev one, the latter
    evaluated on the restored copy under "end". The same numbers either way."""

    def __init__(self, model: torch.nn.Module, dev_loader: DataLoader, eval_loaders: Mapping[str, DataLoader],
                 spec: TaskSpec, device: torch.device | None, epochs: int, held_out_at: str = "new_best",
                 report: bool = True) -> None:
        if held_out_at not in HELD_OUT_AT:
            raise ValueError(f"held_out_at must be one of {', '.join(HELD_OUT_AT)}, got {held_out_at!r}")
        self.model, self.dev_loader, self.eval_loaders, self.spec = model, dev_loader, eval_loaders, spec
        self.device, self.epochs, self.held_out_at, self.report = device, epochs, held_out_at, report
        self.headline = spec.metrics[0]
        self.best_copy: list = []  # held_out_at "end": host_copy(model) at the best dev epoch so far

    def held_out(self) -> dict[str, float]:
        """The held-out sets' metrics on the current weights (rank 0's, on every rank)."""
        return gather_to_all(evaluate(self.model, self.eval_loaders, self.spec, self.device, progress=False))[0]

    def end_of_epoch(self, epoch: int, train_loss: float, history: list[dict[str, float]]) -> dict[str, float]:
        """The `epoch_history` row of `epoch` (0-based) after it trained to `train_loss`, given the rows so far."""
        dev = evaluate(self.model, {DEV: self.dev_loader}, self.spec, self.device, progress=False)
        row = {"epoch": epoch + 1, "train_loss": train_loss, **{f"{DEV}_{key}": value for key, value in dev.items()}}
        row = gather_to_all(row)[0]  # every rank decides alike whether the held-out sets run
        key = f"{DEV}_{self.headline}"
        score = row[key]
        new_best = not math.isnan(score) and all(math.isnan(seen[key]) or score > seen[key] for seen in history)
        if self.held_out_at == "end":
            if new_best and epoch + 1 < self.epochs:
                self.best_copy[:] = host_copy(self.model)
        elif new_best or epoch + 1 == self.epochs:
            row.update(self.held_out())
        if self.report:
            held = f" held-out {self.headline}={row[self.headline]:.4f}" if self.headline in row else ""
            print(f"epoch {epoch + 1}/{self.epochs}: train_loss={train_loss:.4f} dev {self.headline}={score:.4f}{held}",
                  flush=True)
        return row

    def finish(self, history: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, Any]]:
        """(the last epoch's held-out metrics, {"best_dev_epoch", "at_best_dev_epoch"}) from the rows
        of every epoch; under "end" this evaluates the last weights, then the best-dev epoch's
        restored ones if that was an earlier epoch (the model keeps them)."""
        best = best_dev_row(history, self.headline)
        if self.held_out_at == "end":  # the last weights, then the best dev epoch's if that was earlier
            history[-1].update(self.held_out())
            if best is not history[-1]:
                restore_values(self.model, self.best_copy)
                best.update(self.held_out())
        return held_out_metrics(history[-1]), {"best_dev_epoch": best["epoch"],
                                               "at_best_dev_epoch": held_out_metrics(best)}
