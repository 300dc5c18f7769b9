"""The training loop of a recipe: one Bi-Drop step per batch, with progress, skip accounting, kept
fractions, per-epoch callbacks, and checkpoints it can resume from at the next batch.

`LoopState` is what a checkpoint holds of the loop (`bidrop_ds.checkpoint` holds the rest);
`check_resume` refuses, before anything is built, to resume a checkpoint saved with other settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bidrop_ds.bidrop import BiDrop
from bidrop_ds.checkpoint import latest_complete_tag, read_marker
from bidrop_ds.data import split_batch
from bidrop_ds.training.dist import mean, mean_over_ranks


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (None: where they are)."""
    return dict(batch) if device is None else {name: tensor.to(device) for name, tensor in batch.items()}


@dataclass
class LoopState:
    """Where the training loop stands and what it has recorded, saved in every checkpoint, so that a
    resumed run goes on at the next batch, in the same data order, and reports the same totals."""

    epoch: int = 0
    batches_done: int = 0  # of `epoch`
    shuffle_state: torch.Tensor | None = None  # one process: the shuffle generator at the start of `epoch`
    skipped: int = 0
    kept: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # this epoch's
    layer_kept: list[list] = field(default_factory=list)  # [step, {layer: kept fraction}] every log_every steps
    history: list[dict[str, float]] = field(default_factory=list)  # one row per finished epoch (`end_of_epoch`)

    def steps_done(self, per_epoch: int) -> int:
        """Batches trained so far over all epochs (the checkpoint tag's N)."""
        return self.epoch * per_epoch + self.batches_done


def train(bidrop: BiDrop, scheduler: torch.optim.lr_scheduler.LRScheduler | None, loader: DataLoader,
          epochs: int, chunks: int, device: torch.device | None = None, progress: bool = True,
          log_every: int = 0, resume_from: LoopState | None = None,
          save: Callable[[LoopState], None] | None = None, save_every: int = 0,
          end_of_epoch: Callable[[int, float, list[dict[str, float]]], dict[str, float]] | None = None
          ) -> dict[str, Any]:
    """The training loop: one Bi-Drop step per batch. Returns the last-epoch mean loss (over all
    ranks), the mean kept fraction, the number of skipped (non-finite) steps and, every `log_every`
    steps (0: never), the kept fraction per layer. `scheduler` is stepped after every batch; pass
    None when the DeepSpeed engine steps it itself. `resume_from`: a checkpoint's state, whose
    epoch is replayed in its order up to the batches already done. `save(state)` is called every
    `save_every` steps (0: never) and after the last one. `end_of_epoch(epoch, mean loss over the
    ranks, the rows so far)`, called on every rank after each epoch (once: not again for an epoch a
    resumed checkpoint has already recorded), returns that epoch's row of `epoch_history`."""
    bidrop.model.train()
    state = resume_from or LoopState()
    per_epoch = len(loader)
    saved_at = state.steps_done(per_epoch) if resume_from is not None else None
    generator = loader.generator  # one process: the shuffle order; ranks: None (the sampler's seed and epoch)
    bar = tqdm(total=epochs * per_epoch, initial=state.steps_done(per_epoch), desc="train", unit="step",
               dynamic_ncols=True, disable=not progress)
    for epoch in range(state.epoch, epochs):
        if resume_from is not None and epoch == resume_from.epoch:
            if generator is not None:
                generator.set_state(state.shuffle_state)
        else:
            state.epoch, state.batches_done, state.losses = epoch, 0, []
            state.shuffle_state = generator.get_state() if generator is not None else None
        if hasattr(loader.sampler, "set_epoch"):  # DistributedSampler: a new order each epoch
            loader.sampler.set_epoch(epoch)
        for batch in islice(loader, state.batches_done, None):  # the skipped batches still draw the same order
            batch = to_device(batch, device)
            bidrop.count_layers = bool(log_every) and bidrop.step_index % log_every == 0
            result = bidrop.step(split_batch(batch, chunks) if chunks > 1 else batch)
            if scheduler is not None:
                scheduler.step()
            state.batches_done += 1
            state.skipped += result.skipped
            if not result.skipped:
                state.losses.append(result.loss)
                state.kept.append(result.kept_fraction)
                if log_every and result.step % log_every == 0:
                    state.layer_kept.append([result.step, bidrop.kept_by_layer()])
            if save is not None and save_every and state.steps_done(per_epoch) % save_every == 0:
                save(state)
                saved_at = state.steps_done(per_epoch)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{result.loss:.4f}", kept=f"{result.kept_fraction:.3f}")
        if end_of_epoch is not None and len(state.history) == epoch:
            state.history.append(end_of_epoch(epoch, mean_over_ranks(state.losses, device), state.history))
            bidrop.model.train()  # evaluation left it in eval mode
    bar.close()
    if save is not None and saved_at != state.steps_done(per_epoch):
        save(state)
    # kept fraction and skips are global (every rank decides the same); the loss is this rank's
    return {"train_loss_last_epoch": mean_over_ranks(state.losses, device), "mean_kept_fraction": mean(state.kept),
            "skipped_steps": state.skipped, "layer_kept": state.layer_kept, "epoch_history": state.history}


def check_resume(save_dir: str, settings: Mapping[str, Any], program: str) -> None:
    """Stop (SystemExit, one line) unless the newest complete checkpoint of `save_dir` was saved by
    `program` with these `settings` (its marker's description), naming each difference."""
    tag = latest_complete_tag(save_dir)
    saved = read_marker(save_dir, tag)["description"]
    if not isinstance(saved, dict) or saved.keys() != settings.keys():
        raise SystemExit(f"{program}: error: --resume: {save_dir}/{tag} was not saved by {program} "
                         f"--save_dir (its marker holds no {program} settings); load it with "
                         "bidrop_ds.checkpoint.load_checkpoint in the program that wrote it")
    differ = [f"{name} {saved[name]!r}, now {value!r}" for name, value in settings.items() if saved[name] != value]
    if differ:
        raise SystemExit(f"{program}: error: --resume: {save_dir}/{tag} was saved with other settings: "
                         + "; ".join(differ) + ". Resume with the saved settings, or pick another --save_dir "
                         "to start afresh")
