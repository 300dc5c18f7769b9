"""A reference replica for multi-step oracle tests: a plain fp32 copy of the model that steps in
lockstep with a Bi-Drop run on any backend (DeepSpeed, DDP, FSDP2, the HF Trainer), independent of
the plugin at every step.

At each step the reference
1. computes the k per-pass gradients itself (`pass_gradients`): same chunks, same dropout draws as
   Bi-Drop's pass j of step t (seeded with derive_seed(config.seed, t, j, rank)), loss / chunks per
   chunk, averaged over the ranks (one all-reduce per parameter);
2. computes the float64 oracle (tests/oracle.py) of those passes over all eligible elements, with
   |theta| its own weights, and feeds the masked mean (ineligible parameters: the plain mean) to
   its OWN real optimizer (`step`; `skip` for a step the run skipped).
The test compares, at every step, what Bi-Drop read with the reference's passes (`read_error`)
and the run's weights with the reference's (`weight_error`).

Interface (every rank builds its own Reference; collectives run over `group`; `max_grad_norm=`
clips the update's global norm before the reference's optimizer steps, like gradient clipping;
`compute_dtype=torch.bfloat16` computes the passes as a bf16 run does, on the reference's fp32
weights rounded to bf16, so that the comparison is one of rounding in the reduction and the
accumulation (elementwise, ~2^-8), not of two precisions' forward passes (a few % of a
gradient's scale, and AdamW turns such noise on small gradients into whole steps of lr)):
    reference = Reference(fresh_model, lambda params: torch.optim.SGD(params, lr=LR), config)
    with record_reads(bidrop) as reads:        # the k eligible gradients Bi-Drop folds, as read
        result = bidrop.step(chunks)
    passes = reference.pass_gradients(chunks)  # {name: flat float64}, per pass
    read_err = reference.read_error(reads, eligible_layout(bidrop.backend), passes)
    record = reference.step(passes, mask=reference.mask_of(reads, eligible_layout(bidrop.backend)))
    weight_err = reference.weight_error([(name, start, flat weights held), ...])  # per= 'element' / 'parameter'   # the run's (master) weights
`fresh_model` must hold the run's initial (master) weights and be untouched by the run (e.g.
ZeRO-3 partitions the module it is given): build it again with the same seed (a DeepSpeed 16-bit
run's fp32 masters start from the 16-bit module: pass it converted, e.g. `.bfloat16()`). A layout is a list of
(name, start, numel): where each piece of the flat eligible vector sits in the parameter `name`
(flattened). `anchor(held)` sets the reference's weights to the run's (16-bit runs, between steps). `mask=`
(optional) decides the kept elements from the run's reads instead of the
reference's passes, for precisions whose rounding may move elements across the threshold: the
reference then still uses its own gradients, and `step` reports how many elements the two masks
disagree on (`mask_differs`, and `mask_hard_differs` off the threshold's neighbourhood).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.bidrop import derive_seed
from tests.oracle import OracleStep, borderline, oracle_step

Layout = list[tuple[str, int, int]]  # (parameter name, first element in the flattened parameter, count)
Passes = list[dict[str, torch.Tensor]]  # per pass: parameter name -> flat float64 gradient


@dataclass
class ReferenceStep:
    """What one reference step did."""

    oracle: OracleStep          # of the reference's own passes (eligible elements, in `eligible` order)
    mask: torch.Tensor          # the mask applied (the oracle's, or the one given to `step`)
    mask_differs: int           # elements where the applied mask differs from the oracle's
    mask_hard_differs: int      # of those, elements not within 1e-5 (relative) of the oracle's threshold


def eligible_layout(backend: Any) -> Layout:
    """The layout of the flat eligible gradient a backend folds into its statistics: a sharded
    backend's eligible fragments (DeepSpeed ZeRO, FSDP2), else whole eligible parameters (DDP)."""
    fragments = getattr(backend, "eligible_fragments", None)
    if fragments is not None:
        return [(f.name, f.start, f.numel) for f in fragments]
    return [(name, 0, param.numel()) for name, param in zip(backend.eligible_names, backend.eligible)]


@contextmanager
def record_reads(bidrop: BiDrop, scale: float | None = None) -> Iterator[list[torch.Tensor]]:
    """Within the block, record every pass gradient Bi-Drop folds into its statistics (update,
    hold_first, hold_last: each pass is read by exactly one of them), as one flat float64 CPU
    tensor in the backend's eligible layout, divided by `scale` (default: the backend's gradient
    scale, i.e. DeepSpeed's fp16 loss scale, read on entry)."""
    stats, reads = bidrop.stats, []
    divide = bidrop.backend.grad_scale() if scale is None else scale

    def recording(read: Callable) -> Callable:
        def read_and_record(grad):
            pieces = [grad] if isinstance(grad, torch.Tensor) else list(grad)
            flat = [piece.detach().reshape(-1).double().cpu() for piece in pieces]
            reads.append((torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)) / divide)
            return read(grad)
        return read_and_record

    names = ("update", "hold_first", "hold_last")
    saved = {name: stats.__dict__.get(name) for name in names}  # another recorder's, when nested
    for name in names:
        setattr(stats, name, recording(getattr(stats, name)))
    try:
        yield reads
    finally:
        for name in names:
            delattr(stats, name)
            if saved[name] is not None:
                setattr(stats, name, saved[name])


class Reference:
    """A plain fp32 replica (on the CPU) of the model, with its own optimizer, fed the oracle's update."""

    def __init__(self, model: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 config: BiDropConfig, group: dist.ProcessGroup | None = None,
                 max_grad_norm: float | None = None, compute_dtype: torch.dtype = torch.float32) -> None:
        self.model = copy.deepcopy(model).float().cpu().train()
        # A 16-bit run computes its passes on its fp32 masters rounded to 16 bits: so does the reference
        self.compute = self.model if compute_dtype == torch.float32 else copy.deepcopy(self.model).to(compute_dtype)
        self.computed = dict(self.compute.named_parameters())
        self.params = {name: param for name, param in self.model.named_parameters() if param.requires_grad}
        self.optimizer = make_optimizer(list(self.params.values()))
        self.config = config
        self.group = group
        self.max_grad_norm = max_grad_norm  # clip the update's global norm first, as the run's optimizer does
        self.update_norm: float | None = None  # the last update's norm before clipping (with max_grad_norm)
        self.eligible = [name for name in self.params if config.is_eligible(name)]
        # threshold "per_tensor": each eligible parameter keeps its own top p (H6)
        self.groups = ([self.params[name].numel() for name in self.eligible]
                       if getattr(config, "threshold", "global") == "per_tensor" else None)
        self.step_index = 0
        self.steps_taken = 0
        self.travel = {name: torch.zeros(param.numel(), dtype=torch.float64) for name, param in self.params.items()}
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0

    def pass_gradients(self, chunks: Sequence[dict], loss_fn: Callable | None = None,
                       loss_scale: float = 1.0) -> Passes:
        """The k rank-averaged pass gradients of this step (every trainable parameter, flat float64).
        `loss_scale`: the losses are multiplied by it and the gradients divided (an fp16 run's loss
        scale of the step, so that the reference's fp16 gradients underflow like the run's)."""
        if not self.distributed and dist.is_available() and dist.is_initialized():
            raise RuntimeError("Reference was built before the process group started: build it after "
                               "init_process_group, else it neither averages over the ranks nor seeds per rank")
        world = dist.get_world_size(self.group) if self.distributed else 1
        if self.compute is not self.model:
            with torch.no_grad():
                for name, param in self.params.items():
                    self.computed[name].copy_(param)
        passes = []
        for j in range(self.config.k):
            self.compute.zero_grad(set_to_none=True)
            with torch.random.fork_rng():
                torch.manual_seed(derive_seed(self.config.seed, self.step_index, j, self.rank))
                for chunk in chunks:
                    chunk = {key: value.cpu() if isinstance(value, torch.Tensor) else value
                             for key, value in chunk.items()}
                    loss = loss_fn(self.compute, chunk) if loss_fn is not None else self.compute(**chunk).loss
                    (loss.float() * loss_scale / len(chunks)).backward()
            flat = torch.cat([(param.grad if param.grad is not None else torch.zeros_like(param)).reshape(-1).float()
                              for param in (self.computed[name] for name in self.params)])
            if world > 1:  # one all-reduce per pass
                dist.all_reduce(flat, group=self.group)
            flat /= world * loss_scale
            sizes = [param.numel() for param in self.params.values()]
            passes.append({name: grad.double() for name, grad in zip(self.params, flat.split(sizes))})
        self.compute.zero_grad(set_to_none=True)
        return passes

    def flat_eligible(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[name] for name in self.eligible])

    def mask_of(self, reads: list[torch.Tensor], layout: Layout) -> torch.Tensor:
        """The float64 oracle's mask of the run's reads (gathered from every rank), with |theta| the
        reference's weights: the mask a correct plugin applies, given what it read."""
        full = self.assemble(reads, layout)
        abs_param = self.flat_eligible({name: p.detach().reshape(-1).double() for name, p in self.params.items()}).abs()
        return oracle_step(full, abs_param, self.config.p, score=self.config.score, eps=self.config.eps,
                           rescale=self.config.rescale, groups=self.groups).mask

    def assemble(self, reads: list[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
        """The run's reads from every rank, laid out like `flat_eligible` (every element must be held by some rank)."""
        pieces = [(layout, reads)]
        if self.distributed:
            pieces = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(pieces, (layout, reads), group=self.group)
        sizes = {name: self.params[name].numel() for name in self.eligible}
        out = []
        for j in range(len(reads)):
            full = {name: torch.full((size,), float("nan"), dtype=torch.float64) for name, size in sizes.items()}
            for rank_layout, rank_reads in pieces:
                offset = 0
                for name, start, numel in rank_layout:
                    full[name][start:start + numel] = rank_reads[j][offset:offset + numel]
                    offset += numel
            flat = self.flat_eligible(full)
            if torch.isnan(flat).any():
                raise AssertionError(f"the ranks' reads leave {int(torch.isnan(flat).sum())} eligible elements uncovered")
            out.append(flat)
        return out

    def read_error(self, reads: list[torch.Tensor], layout: Layout, passes: Passes) -> float:
        """Max over passes and elements of |read - reference| / (max |reference pass| over the eligible
        elements): 0 for a perfect read, ~1 for a missing or doubled pass."""
        if len(reads) != len(passes):
            return float("inf")
        worst = 0.0
        for read, grads in zip(reads, passes):
            scale = max(self.flat_eligible(grads).abs().max().item(), 1e-30)
            offset = 0
            for name, start, numel in layout:
                expected = grads[name][start:start + numel]
                if numel:
                    worst = max(worst, (read[offset:offset + numel] - expected).abs().max().item() / scale)
                offset += numel
        return worst

    def step(self, passes: Passes, mask: torch.Tensor | None = None) -> ReferenceStep:
        """The oracle's update of the reference's `passes` into .grad, and the reference optimizer's step."""
        abs_param = self.flat_eligible({name: p.detach().reshape(-1).double() for name, p in self.params.items()}).abs()
        oracle = oracle_step([self.flat_eligible(grads) for grads in passes], abs_param, self.config.p,
                             score=self.config.score, eps=self.config.eps, rescale=self.config.rescale,
                             groups=self.groups)
        applied = oracle.mask if mask is None else mask
        differs = applied != oracle.mask
        update = oracle.mean * applied
        if self.config.rescale:
            update = update / self.config.p
        sizes = [self.params[name].numel() for name in self.eligible]
        eligible_update = dict(zip(self.eligible, update.split(sizes)))
        for name, param in self.params.items():
            flat = eligible_update.get(name)
            if flat is None:  # ineligible: the plain mean of the passes
                flat = sum(grads[name] for grads in passes) / len(passes)
            param.grad = flat.to(param.dtype).reshape(param.shape).clone()
        before = self.weights()
        if self.max_grad_norm:  # the norm before clipping, for the test to see that it clipped
            self.update_norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for name, weights in self.weights().items():
            self.travel[name] += (weights - before[name]).abs()
        self.step_index += 1
        self.steps_taken += 1
        return ReferenceStep(oracle=oracle, mask=applied, mask_differs=int(differs.sum()),
                             mask_hard_differs=int((differs & ~borderline(oracle)).sum()))

    def zero_gradient_step(self) -> None:
        """One step of the reference's optimizer with zero gradients and no Bi-Drop step, as
        DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 with bf16) takes at construction to create the
        optimizer's state (with AdamW: one weight decay, and Adam's step count at 1)."""
        for param in self.params.values():
            param.grad = torch.zeros_like(param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def anchor(self, held: Iterable[tuple[str, int, torch.Tensor]]) -> None:
        """Set the reference's weights to the run's (the `held` pieces of every rank, gathered; the
        optimizer's state stays the reference's own): for 16-bit runs, after the step's checks, so
        that the next step compares that step's rounding and not the drift of all steps before
        (a weight that rounds to the other 16-bit neighbour changes every gradient it touches)."""
        mine = [(name, start, values.detach().reshape(-1).double().cpu()) for name, start, values in held]
        pieces = [mine]
        if self.distributed:
            pieces = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(pieces, mine, group=self.group)
        with torch.no_grad():
            for rank_pieces in pieces:
                for name, start, values in rank_pieces:
                    flat = self.params[name].view(-1)
                    flat[start:start + values.numel()] = values.to(flat.dtype)

    def skip(self) -> None:
        """A step the run skipped: no update, the pass seeds move on."""
        self.step_index += 1

    def weights(self) -> dict[str, torch.Tensor]:
        """The reference's weights, flat float64, by parameter name."""
        return {name: param.detach().reshape(-1).double() for name, param in self.params.items()}

    def weight_error(self, held: Iterable[tuple[str, int, torch.Tensor]], per: str = "element") -> float:
        """Max over the elements of the `held` pieces (name, start, flat weights the run holds) of
        |run - reference|, less fp32 rounding (2^-22 |w| per step taken), relative to the element's
        travel (the sum of the reference's |moves| so far; per="element") or to the largest travel
        in its parameter (per="parameter": for 16-bit runs, whose gradients differ from the
        reference's by rounding relative to the passes' scale, not to each element's), plus 1e-6
        of the largest travel: 0 for a run that follows the reference, ~1 where a step's update was
        lost, doubled or mis-masked."""
        if per not in ("element", "parameter"):
            raise ValueError(f"weight_error: per must be 'element' or 'parameter', got {per!r}")
        weights = self.weights()
        floor = 1e-6 * max(max(t.max().item() for t in self.travel.values()), 1e-30)
        steps = max(self.steps_taken, 1)
        worst = 0.0
        for name, start, values in held:
            if values.numel():
                piece = slice(start, start + values.numel())
                expected = weights[name][piece]
                diff = (values.reshape(-1).double().cpu() - expected).abs() - steps * 2.0**-22 * expected.abs()
                travel = self.travel[name][piece] if per == "element" else self.travel[name].max()
                worst = max(worst, (diff.clamp_min(0) / (travel + floor)).max().item())
        return worst


# ----- H2: one lockstep step, shared by the DDP, plain-model, FSDP2 and Trainer tests --------------

def held_weights(bidrop: BiDrop) -> list[tuple[str, int, torch.Tensor]]:
    """The weights the run holds on this rank, as `Reference.weight_error` takes them: a sharded
    backend's (fp32 master) fragments, else every trainable parameter of the (DDP-wrapped) model."""
    partition = getattr(bidrop.backend, "partition", None)
    if partition is not None:
        return [(f.name, f.start, master) for f, master in zip(partition.fragments, partition.master_views())]
    module = getattr(bidrop.model, "module", bidrop.model)
    return [(name, 0, param.detach().reshape(-1)) for name, param in module.named_parameters() if param.requires_grad]


def lockstep(reference: Reference, bidrop: BiDrop, reads: list[torch.Tensor], chunks: Sequence[dict],
             held: Iterable[tuple[str, int, torch.Tensor]] | None = None,
             loss_fn: Callable | None = None) -> dict[str, Any]:
    """After the run's step (its passes recorded in `reads`): the reference's own passes on the same
    `chunks`, their error against the reads, the reference's step (mask decided from the reads, see
    `Reference.step`) and the run's `held` weights (default `held_weights(bidrop)`) against the
    reference's afterwards. `mask`: the mask applied, over the eligible elements in
    `reference.eligible` order."""
    held = held_weights(bidrop) if held is None else held
    passes = reference.pass_gradients(chunks, loss_fn)
    layout = eligible_layout(bidrop.backend)
    record = reference.step(passes, mask=reference.mask_of(reads, layout))
    return {"read_err": reference.read_error(reads, layout, passes), "weight_err": reference.weight_error(held),
            "mask_differs": record.mask_differs, "mask_hard_differs": record.mask_hard_differs,
            "kept": int(record.mask.sum()), "N": record.mask.numel(), "mask": record.mask}


__all__ = ["Layout", "Passes", "Reference", "ReferenceStep", "eligible_layout", "held_weights", "lockstep",
           "record_reads"]
