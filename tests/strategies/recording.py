"""Run a strategy on any backend while recording, per step, the reduced gradient it read and the
weights before and after, assembled per parameter over all ranks (a test-only gather), so that
each strategy's rule can be checked against a float64 oracle of the whole model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from bidrop_ds import BiDrop


@dataclass
class Recorded:
    grads: list[torch.Tensor]   # per folded pass: the eligible elements, float64, parameter order
    before: list[torch.Tensor]  # per step: eligible weights before the step
    after: list[torch.Tensor]   # per step: eligible weights after the step
    kept: list[float]           # per step: the kept fraction reported
    names: list[tuple[str, int]]  # eligible (name, numel) in the flat order above


def _pieces(bidrop: BiDrop, flat: torch.Tensor) -> list[tuple[str, int, torch.Tensor]]:
    """(name, start in the parameter, values) of this rank's eligible elements of a flat layout."""
    backend = bidrop.backend
    partition = getattr(backend, "partition", None)
    if partition is None:  # torch backend: every eligible parameter whole, in order
        return [(s.name, 0, flat[a:b]) for s in backend.parameter_slices() for a, b in s.ranges]
    return [(f.name, f.start, flat[f.offset:f.offset + f.numel]) for f in partition.fragments if f.eligible and f.numel]


def _assemble(bidrop: BiDrop, flat: torch.Tensor) -> torch.Tensor:
    slices = bidrop.backend.parameter_slices()
    mine = [(name, start, values.detach().double().cpu().clone()) for name, start, values in _pieces(bidrop, flat)]
    everyone = [mine]
    if dist.is_initialized() and not hasattr(bidrop.backend, "eligible_names"):
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    full = {s.name: torch.zeros(s.numel, dtype=torch.float64) for s in slices}
    for pieces in everyone:
        for name, start, values in pieces:
            full[name][start:start + values.numel()] = values
    return torch.cat([full[s.name] for s in slices])


def _weights(bidrop: BiDrop) -> torch.Tensor:
    backend = bidrop.backend
    if hasattr(backend, "partition"):
        return backend.partition.master()
    return torch.cat([p.detach().reshape(-1) for p in backend.eligible]).float()


def record(bidrop: BiDrop, fisher_batches: list, batches: list) -> Recorded:
    """Estimate the Fisher mask on `fisher_batches` (if any), then one step per batch."""
    grads: list[torch.Tensor] = []
    update = bidrop.stats.update

    def recording_update(grad):
        pieces = [grad] if isinstance(grad, torch.Tensor) else grad
        grads.append(_assemble(bidrop, torch.cat([g.reshape(-1).float() for g in pieces])))
        update(grad)

    bidrop.stats.update = recording_update
    if fisher_batches:
        bidrop.estimate_fisher(fisher_batches)
    before, after, kept = [], [], []
    for batch in batches:
        before.append(_assemble(bidrop, _weights(bidrop)))
        kept.append(bidrop.step(batch).kept_fraction)
        after.append(_assemble(bidrop, _weights(bidrop)))
    del bidrop.stats.update
    return Recorded(grads, before, after, kept, [(s.name, s.numel) for s in bidrop.backend.parameter_slices()])
