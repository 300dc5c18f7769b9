"""Fixed subsets of a split and the loaders of a run: one process, or a disjoint share on every rank."""

from __future__ import annotations

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler

from bidrop_ds.training.dist import world

SUBSET_SEED = 0  # the train/eval subsets are fixed; a recipe's --train_seed varies only the training


def subset(split: datasets.Dataset, size: int) -> datasets.Dataset:
    """`size` examples drawn with a fixed seed (all of them for 0 or more than there are)."""
    if size == 0 or size >= len(split):
        return split
    return split.shuffle(seed=SUBSET_SEED).select(range(size))


def make_loaders(encoded: datasets.DatasetDict, collate, batch_size: int, seed: int,
                 distributed: bool = False) -> tuple[DataLoader, dict[str, DataLoader]]:
    """(train loader, {held-out set: loader}) for this process; every split of `encoded` other
    than "train" is a held-out set, kept in order.

    Single process: global batches in an order seeded by `seed` (the last one may be short).
    Distributed: every rank gets a disjoint batch_size/world share of every global batch (a
    DistributedSampler with the same seed on all ranks; drop_last, so all ranks run the same
    steps), and every world-th example of each held-out set (each one on exactly one rank)."""
    rank, size = world() if distributed else (0, 1)
    train = encoded["train"]
    if distributed:
        sampler = DistributedSampler(train, num_replicas=size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        train_loader = DataLoader(train, batch_size=batch_size // size, sampler=sampler, drop_last=True,
                                  collate_fn=collate)
        if len(train_loader) == 0:
            raise ValueError(f"{len(train)} train examples make no full global batch of --batch_size {batch_size} "
                             f"on {size} rank(s); use a smaller --batch_size or a larger --train_size")
    else:
        train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                  generator=torch.Generator().manual_seed(seed))
    # each with its own generator: a loader without one draws its workers' seed from the global random
    # stream on every pass, i.e. from the dropout draws of the training after it
    eval_loaders = {name: DataLoader(split, batch_size=max(1, 2 * batch_size // size),
                                     sampler=range(rank, len(split), size), collate_fn=collate,
                                     generator=torch.Generator())
                    for name, split in encoded.items() if name != "train"}
    return train_loader, eval_loaders
