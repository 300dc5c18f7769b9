"""A mask rule on flat tensors, without a model or the driver: its context over one rank's
eligible elements (a LocalCommunicator: this rank holds them all), and the passes folded as the
driver folds them (earlier passes into the statistics, the last one held where it lives)."""

from __future__ import annotations

from typing import Sequence

import torch

from bidrop_ds import BiDropConfig
from bidrop_ds.backends.partition import ParameterSlice
from bidrop_ds.core import LocalCommunicator, PassStatistics
from bidrop_ds.strategies import RuleContext


def flat_context(config: BiDropConfig, weights: torch.Tensor,
                 parameters: Sequence[ParameterSlice] | None = None) -> RuleContext:
    """One process holding every element of `weights` (one parameter unless `parameters` says);
    step t's generator is seeded by t alone."""
    numel = weights.numel()
    comm = LocalCommunicator()
    return RuleContext(config=config, stats=PassStatistics(numel), weights=lambda: [weights],
                       parameters=parameters or [ParameterSlice("weight", numel, ((0, numel),))],
                       total_numel=numel, selection_comm=comm, agreement_comm=comm,
                       generator=lambda step: torch.Generator().manual_seed(step))


def fold_passes(stats: PassStatistics, passes: Sequence[torch.Tensor]) -> None:
    """Start a step and fold `passes` as the driver does; the last one stays in its own tensor."""
    stats.reset()
    for grad in passes[:-1]:
        stats.update(grad)
    stats.hold_last(passes[-1])
