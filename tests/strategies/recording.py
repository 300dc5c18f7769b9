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
    if not hasattr(backend, "partition"):  # torch backend: every eligible parameter whole, in order
        return [(s.name, 0, flat[a:b]) for s in backend.parameter_slices() for a, b in s.ranges]
    out, offset = [], 0
    for f in backend.eligible_fragments:  # laid one after another in the statistics
        out.append((f.name, f.start, flat[offset:offset + f.numel]))
        offset += f.numel
    return out


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
    """The (fp32 master) weights of the eligible elements, in the statistics' layout."""
    return torch.cat([t.detach().reshape(-1).float() for t in bidrop.backend.abs_params()])


def record(bidrop: BiDrop, fisher_batches: list, batches: list) -> Recorded:
    """Estimate the Fisher mask on `fisher_batches` (if any), then one step per batch."""
    grads: list[torch.Tensor] = []
    stats = bidrop.stats

    def recording(read):
        def read_and_record(grad):
            pieces = [grad] if isinstance(grad, torch.Tensor) else grad
            grads.append(_assemble(bidrop, torch.cat([g.reshape(-1).float() for g in pieces])))
            read(grad)
        return read_and_record

    stats.update, stats.hold_last = recording(stats.update), recording(stats.hold_last)
    if fisher_batches:
        bidrop.estimate_fisher(fisher_batches)
    before, after, kept = [], [], []
    for batch in batches:
        before.append(_assemble(bidrop, _weights(bidrop)))
        kept.append(bidrop.step(batch).kept_fraction)
        after.append(_assemble(bidrop, _weights(bidrop)))
    del stats.update, stats.hold_last
    return Recorded(grads, before, after, kept, [(s.name, s.numel) for s in bidrop.backend.parameter_slices()])
