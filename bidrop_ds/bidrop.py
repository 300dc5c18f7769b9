"""BiDrop: one Bi-Drop step (k dropout passes, masked mean, optimizer step) on any backend.

Two levels of use:
- `step(batch_or_chunks)` runs a whole step: k passes over the chunks, mask, optimizer step.
- the hooks it is built from, for a training loop of your own:
      bidrop.begin_step()
      for j in range(k):
          with bidrop.pass_rng(j):                  # the pass's dropout draws (seeded if config.seed)
              for each chunk: with bidrop.micro_step(last_in_pass, last_in_step): forward + backward
          bidrop.fold_pass()
      result = bidrop.apply_mask()     # masked mean written into the grads
      optimizer.step()                 # a no-op if result.skipped: all grads were set to None
"""

from __future__ import annotations

import hashlib
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, NoReturn, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from bidrop_ds.backends.deepspeed_zero import data_parallel_group, is_deepspeed_engine
from bidrop_ds.backends.fsdp2 import Fsdp2Backend, is_fsdp2_model, shard_group
from bidrop_ds.backends.torch_ddp import TorchBackend
from bidrop_ds.comm import ProcessGroupCommunicator
from bidrop_ds.config import BLOCK, BiDropConfig
from bidrop_ds.core import Communicator, LocalCommunicator, PassStatistics
from bidrop_ds.core.ranges import layout_slices
from bidrop_ds.strategies import ChildTuningD, RuleContext, make_rule

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class StepResult:
    """What one Bi-Drop step did. `loss` is the mean over passes and chunks (None from the hooks)."""

    kept_fraction: float
    skipped: bool
    threshold: float | None
    step: int
    loss: float | None = None


def layer_of(name: str) -> str:
    """`encoder.layer.3.attention...` -> `layer.3` (the repeated block a parameter belongs to; else the name)."""
    found = re.search(rf"(?:^|\.)({BLOCK})\.", name)
    return found.group(1) if found else name


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


class SkipLimitError(RuntimeError):
    """Too many steps in a row were skipped for non-finite values (config.max_consecutive_skips)."""


# Dropout rates of HF model configs (attention dropout is often applied functionally, not as a module).
DROPOUT_CONFIG_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "hidden_dropout", "attention_dropout",
                       "dropout", "dropout_rate", "resid_pdrop", "attn_pdrop", "embd_pdrop", "classifier_dropout")


def has_active_dropout(module: nn.Module) -> bool:
    """Whether passes can differ: a dropout module with p > 0, or a dropout rate > 0 in an HF config."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()):
        return True
    config = getattr(module, "config", None)
    return any(isinstance(getattr(config, key, None), (int, float)) and getattr(config, key) > 0
               for key in DROPOUT_CONFIG_KEYS)


def _construction_comm(model: nn.Module) -> Communicator:
    """The ranks that build a BiDrop on `model` together: DeepSpeed's data-parallel group, an FSDP2
    model's shard group, else the default group (local when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return LocalCommunicator()
    if is_deepspeed_engine(model):
        return ProcessGroupCommunicator(data_parallel_group(model))
    return ProcessGroupCommunicator(shard_group(model) if is_fsdp2_model(model) else None)


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's collectives run (the engine's device; else its first parameter's)."""
    if is_deepspeed_engine(model):
        return torch.device(model.device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_optimizer_holds(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """An optimizer over other parameters (another model's, or the ones sharding replaced) would
    make every step a silent no-op: refuse it, naming a trainable parameter it does not hold."""
    held = {id(param) for group in getattr(optimizer, "param_groups", ()) for param in group["params"]}
    trainable = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
    missing = [name for name, param in trainable if id(param) not in held]
    if missing:
        raise ValueError(f"BiDrop: the optimizer does not hold the model's trainable parameter {missing[0]!r} "
                         f"({len(missing)} of {len(trainable)} trainable parameters are missing); build the "
                         "optimizer over this model's parameters, after wrapping or sharding it, and set "
                         "requires_grad=False on parameters you do not train")


def _raise_shared_failure(comm: Communicator, failure: Exception | None) -> NoReturn:
    """Some rank failed to build its part: gather which and why (a collective on this path only),
    then raise the rank's own exception there and, on the others, one that names it."""
    if not isinstance(comm, ProcessGroupCommunicator):
        raise failure  # one process: the failure is this one
    report = None if failure is None else (dist.get_rank(), f"{type(failure).__name__}: {failure}")
    reports = comm.all_gather_object(report)
    if failure is not None:
        raise failure
    rank, message = next(report for report in reports if report is not None)
    raise RuntimeError(f"BiDrop: construction failed on rank {rank}: {message}")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, pass, rank), stable across platforms and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BiDrop:
    """Bi-Drop on a model and its optimizer (plain nn.Module or DDP-wrapped)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 config: BiDropConfig | None = None) -> None:
        self.config = config if config is not None else BiDropConfig()
        self.model = model
        comm, device = _construction_comm(model), _device_of(model)
        failure = None
        try:  # the local part: no collective, so that a failure here can be shared with the other ranks
            if not isinstance(self.config, BiDropConfig):
                raise TypeError(f"BiDrop: config must be a BiDropConfig, got {type(self.config).__name__}")
            self.backend = self._make_backend(model, optimizer)
            self._check_dropout(model)
            self.stats = PassStatistics(self.backend.numel, device=self.backend.device)
        except Exception as err:  # noqa: BLE001 - raised again on every rank by _agree_at_construction
            failure = err
        self._agree_at_construction(comm, device, failure)
        self.step_index = 0  # steps begun so far; seeds the passes of seeded runs
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._in_step = False
        self.count_layers = False  # count each layer's kept elements at apply_mask (kept_by_layer)
        self._layer_counts: tuple[list[str], torch.Tensor] | None = None
        self.rule_context = self._rule_context()
        self.rule = make_rule(self.rule_context)
        self.backend.begin_step()

    @property
    def _passes_need_dropout(self) -> bool:
        """Bi-Drop's k > 1 passes differ only by their dropout draws."""
        return self.config.strategy == "bidrop" and self.config.k > 1

    def _check_dropout(self, model: nn.Module) -> None:
        """Bi-Drop's passes differ only by their dropout draws: without active dropout the k
        gradients are equal and every score's spread is 0. Refuse, or warn if the user opts in."""
        if not self._passes_need_dropout:
            return
        module = getattr(model, "module", model)  # DeepSpeed engine, DDP
        if has_active_dropout(module):
            return
        message = (f"BiDrop: {type(module).__name__} has no dropout module with p > 0, so the k = {self.config.k} "
                   "passes give identical gradients (no sub-network estimate). Enable dropout in the model "
                   "(e.g. hidden_dropout_prob=0.1), or set allow_no_dropout=True to run anyway")
        if not self.config.allow_no_dropout:
            raise ValueError(message)
        logger.warning(message.split(". Enable")[0] + "; running anyway (allow_no_dropout=True)")

    def _agree_at_construction(self, comm: Communicator, device: torch.device, failure: Exception | None) -> None:
        """The one collective of construction (an all-reduce of 4 integers): whether every rank built
        its part, a fingerprint of the config, backend, dtypes (and, where every rank holds every
        element, the eligible count), and the eligible elements held. A failure on one rank raises on
        every rank (with that rank's message), a mismatch fails, and no rank is left waiting."""
        fingerprint, held = (self._fingerprint(), self.backend.held_numel) if failure is None else (0, 0)
        probe = torch.tensor([failure is not None, fingerprint, 1, held], dtype=torch.int64, device=device)
        comm.all_reduce_sum(probe)
        failed, fingerprints, ranks, held_sum = probe.tolist()
        if failed:
            _raise_shared_failure(comm, failure)
        if fingerprints != fingerprint * ranks:
            raise ValueError(f"BiDrop: the {ranks} ranks disagree on the Bi-Drop config, the backend, the "
                             f"eligible element count or the parameter dtypes (this rank: "
                             f"{type(self.backend).__name__}, {self.backend.held_numel} eligible elements held, "
                             f"dtypes {self._dtypes()}, config {self.config.to_dict()}); "
                             "launch every rank with the same settings and model")
        sharded = self.backend.selection_comm is self.backend.agreement_comm
        self.backend.total_numel = held_sum if sharded else held
        if self.backend.total_numel == 0:
            names = [name for name, _ in getattr(self.model, "module", self.model).named_parameters()][:3]
            raise ValueError(f"BiDrop: include={list(self.config.include)} / exclude={list(self.config.exclude)} "
                             f"select no trainable parameter (names look like {names}); adjust the patterns")

    def _dtypes(self) -> list[str]:
        module = getattr(self.model, "module", self.model)
        return sorted({str(param.dtype) for param in module.parameters() if param.requires_grad})

    def _fingerprint(self) -> int:
        """A 31-bit hash of what all ranks must share (the eligible count only where every rank holds all)."""
        sharded = self.backend.selection_comm is self.backend.agreement_comm
        count = "sharded" if sharded else self.backend.held_numel
        text = f"{self.config.to_json()}|{type(self.backend).__name__}|{count}|{self._dtypes()}"
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") >> 1

    def _make_backend(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        if is_deepspeed_engine(model):
            if optimizer is not None:
                raise ValueError("BiDrop(engine, config=...): a DeepSpeed engine brings its own optimizer; "
                                 "do not pass one")
            from bidrop_ds.backends.deepspeed_zero import DeepSpeedBackend

            return DeepSpeedBackend(model, self.config)
        if optimizer is None:
            raise ValueError("BiDrop(model, optimizer, config): a plain, DDP or FSDP2 model needs its optimizer")
        _check_optimizer_holds(optimizer, getattr(model, "module", model))
        if is_fsdp2_model(model):
            return Fsdp2Backend(model, optimizer, self.config)
        return TorchBackend(model, optimizer, self.config)

    # ----- the hooks -------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Start a step: zero the gradients and the statistics. A model in eval mode is refused."""
        if self._passes_need_dropout and not getattr(self.model, "module", self.model).training:
            raise RuntimeError(f"BiDrop: the model is in eval mode, so dropout is off and the k = {self.config.k} "
                               "passes would be identical; call model.train() before training (from_pretrained "
                               "returns a model in eval mode, and model.eval() for an evaluation needs a "
                               "model.train() after it)")
        self.backend.begin_step()
        self.stats.reset()
        self._in_step = True

    def fold_pass(self) -> None:
        """After a pass's backward(s): fold its reduced gradient into the statistics and reset it;
        the step's last pass is left where it lives, for the final sweep in `apply_mask`."""
        if not self._in_step:
            raise RuntimeError("BiDrop.fold_pass() called outside a step; call begin_step() first")
        if self.stats.count >= self.config.k:
            raise RuntimeError(f"BiDrop.fold_pass(): already {self.stats.count} passes, config.k = {self.config.k}")
        if self.stats.count == self.config.k - 1:
            self.stats.hold_last(self.backend.pass_gradient())
        elif self.stats.count == 0 and self.config.k == 2 and getattr(self.backend, "retains", False):
            self.stats.hold_first(self.backend.retain_pass())  # pass 1 stays where it lives
        else:
            self.stats.update(self.backend.pass_gradient())
            self.backend.end_pass()

    def apply_mask(self, grad_scale: float | None = None) -> StepResult:
        """After the k passes: decide the mask and write the final gradient (before optimizer.step()).

        `grad_scale` is the factor the gradients carry (e.g. a GradScaler's loss scale; None: the
        backend's own, i.e. DeepSpeed's fp16 loss scale, else 1), so that the mask is that of the
        unscaled gradients; the written gradient keeps the scale.
        If any statistic is non-finite on any rank, every rank skips: all grads are set to None so
        that the optimizer's step touches neither parameters nor state. After
        `config.max_consecutive_skips` skips in a row, SkipLimitError is raised (on every rank).
        """
        if not self._in_step or self.stats.count != self.config.k:
            raise RuntimeError(f"BiDrop.apply_mask() after {self.stats.count} folded passes; "
                               f"config.k = {self.config.k} (call fold_pass() after each pass)")
        self._in_step = False
        step = self.step_index
        self.step_index += 1
        if grad_scale is None:
            grad_scale = self.backend.grad_scale()
        in_place = self.rule.prepare(step, grad_scale)
        finite = self.stats.is_finite() and self.backend.others_finite()
        outcome = self.rule.decide(step, finite, grad_scale)
        if outcome is None:
            self._layer_counts = None
            return self._skip(step)
        self.consecutive_skips = 0
        if not in_place:
            self.backend.write_update(self.stats.mean)
        self.backend.finish_others(self.config.k)
        self.stats.drop_held()  # a retained pass 1's storage goes before the optimizer's step
        self._layer_counts = self._count_layers() if self.count_layers else None
        return StepResult(kept_fraction=outcome.kept / self.backend.total_numel, skipped=False,
                          threshold=outcome.threshold, step=step)

    def estimate_fisher(self, batches: Iterable[Batch | Sequence[Batch]], loss_fn: LossFn | None = None,
                        progress: bool = False) -> int:
        """ChildTuning-D: fix the mask from the Fisher information of `batches` (typically one pass
        over the training data), before the first step. Each batch (or list of chunks) runs one
        forward+backward, reduced like a training pass, with no optimizer step; batches with a
        non-finite gradient on any rank are left out. Returns the number of batches used."""
        if self.config.strategy != "childtuning-d":
            raise ValueError(f"BiDrop.estimate_fisher: only strategy 'childtuning-d' uses a Fisher mask, "
                             f"this run's strategy is {self.config.strategy!r}")
        if not isinstance(self.rule, ChildTuningD):  # p = 1: every element is updated anyway
            return 0
        for index, batch in enumerate(tqdm(batches, desc="fisher", unit="batch", disable=not progress)):
            chunks = self._chunks(batch)
            self._run_passes(chunks, loss_fn, seed_step=-1 - index)
            self.stats.fold_last()
            finite, _ = self.rule_context.agree(self.stats.is_finite())
            if finite:
                self.rule.accumulate(self.stats.mean, self.backend.grad_scale())
            self._in_step = False
            self.backend.discard_gradients()
            self.backend.zero_grad()
        self.rule.finish()
        return self.rule.batches

    # ----- the whole step --------------------------------------------------------------------
    def step(self, batch_or_chunks: Batch | Sequence[Batch], loss_fn: LossFn | None = None) -> StepResult:
        """One Bi-Drop step on a batch (or a list of micro-batch chunks of it).

        Each of the k passes runs forward+backward per chunk (loss / chunks, so equal chunks give
        the batch's gradient); then the mask, `optimizer.step()` (unless skipped), zeroed grads.
        """
        losses = self._run_passes(self._chunks(batch_or_chunks), loss_fn, seed_step=self.step_index)
        result = self.apply_mask()
        if not result.skipped:
            self.backend.optimizer_step()
        self.backend.zero_grad()
        mean_loss = torch.stack(losses).float().mean().item()
        return StepResult(kept_fraction=result.kept_fraction, skipped=result.skipped,
                          threshold=result.threshold, step=result.step, loss=mean_loss)

    def _chunks(self, batch_or_chunks: Batch | Sequence[Batch]) -> list[Batch]:
        chunks = list(batch_or_chunks) if isinstance(batch_or_chunks, (list, tuple)) else [batch_or_chunks]
        if not chunks:
            raise ValueError("BiDrop.step: got an empty list of chunks")
        self.backend.check_chunks(len(chunks))
        return chunks

    def _run_passes(self, chunks: list[Batch], loss_fn: LossFn | None, seed_step: int) -> list[torch.Tensor]:
        """Begin a step and fold config.k passes over the chunks; returns the chunk losses."""
        self.begin_step()
        losses = []
        for pass_index in range(self.config.k):
            with self._rng(seed_step, pass_index):
                for chunk_index, chunk in enumerate(chunks):
                    last_in_pass = chunk_index == len(chunks) - 1
                    with self.micro_step(last_in_pass, last_in_pass and pass_index == self.config.k - 1):
                        loss = self._loss(chunk, loss_fn)
                        self.backend.backward(loss, len(chunks))
                    losses.append(loss.detach())
            self.fold_pass()
        return losses

    def _loss(self, chunk: Batch, loss_fn: LossFn | None) -> torch.Tensor:
        """The chunk's loss: `loss_fn(model, chunk)`, or the `.loss` of the model's output."""
        if loss_fn is not None:
            loss = loss_fn(self.model, chunk)
            if not isinstance(loss, torch.Tensor):
                raise ValueError(f"BiDrop.step: loss_fn returned {type(loss).__name__}, not a loss tensor")
            return loss
        output = self.model(**chunk)
        loss = getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"BiDrop.step: the model returned no loss ({type(output).__name__} without one: a batch "
                             f"without `labels`? it has {sorted(chunk)}); add the labels, or pass "
                             "step(batch, loss_fn=lambda model, batch: ...) that returns the loss")
        return loss

    def kept_by_layer(self) -> dict[str, float]:
        """Per layer (the block index in the parameter names, e.g. `layer.3`; else the name), the
        fraction of eligible elements the last step updated, over all ranks. Needs
        `count_layers = True` before that step (the counts are taken from the written gradient);
        an element with an exactly zero gradient counts as masked. One small all-reduce; meant for
        logging every few steps."""
        if self._layer_counts is None:
            raise RuntimeError("BiDrop.kept_by_layer(): set bidrop.count_layers = True before the step "
                               "(the counts are taken when the update is written)")
        names, counts = self._layer_counts
        kept = counts[0::2].clone()
        self.backend.selection_comm.all_reduce_sum(kept)
        return {name: int(k) / int(n) for name, k, n in zip(names, kept.tolist(), counts[1::2].tolist())}

    def _count_layers(self) -> tuple[list[str], torch.Tensor]:
        """(layer names, this rank's [kept, total] per layer) from the eligible gradient just written."""
        slices = self.backend.parameter_slices()
        layers = [layer_of(piece.name) for piece in slices]
        names = sorted(set(layers), key=_natural_key)
        written = self.backend.pass_gradient()
        pieces = [written] if isinstance(written, torch.Tensor) else written
        counts = torch.zeros(2 * len(names), dtype=torch.int64, device=self.backend.device)
        for layer, piece in zip(layers, slices):
            row = names.index(layer)
            for start, end in piece.ranges:
                for view in layout_slices(pieces, start, end):
                    counts[2 * row] += torch.count_nonzero(view)
            counts[2 * row + 1] += piece.numel
        return names, counts

    def memory_bytes(self) -> int:
        """Bytes of the buffers the plugin allocated on this rank: the statistics (4 per eligible
        element held for k = 2 with fp32 gradients, else 8; none where pass 1 stays in the engine's
        own accumulators, ZeRO-2 with fp32 ones) and, where the gradient partition does not sum the
        passes itself (ZeRO-1), an fp32 sum of the ineligible elements."""
        return self.stats.nbytes + self.backend.own_bytes

    # ----- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The plugin's own state: counters (they seed the passes) and the strategy's bookkeeping."""
        return {"step_index": self.step_index, "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips, "config": self.config.to_dict(),
                "strategy": self.rule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_index = int(state["step_index"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.rule.load_state_dict(state.get("strategy", {}))

    # ----- internals ----------------------------------------------------------------------------
    def _skip(self, step: int) -> StepResult:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.backend.skip_step()
        self.stats.drop_held()
        logger.warning("Bi-Drop step %d skipped: non-finite gradient in some pass on some rank "
                       "(%d skipped so far, %d in a row)", step, self.skipped_steps, self.consecutive_skips)
        limit = self.config.max_consecutive_skips
        if limit and self.consecutive_skips >= limit:
            raise SkipLimitError(f"Bi-Drop: {self.consecutive_skips} steps in a row had a non-finite loss or "
                                 f"gradient (steps {step - self.consecutive_skips + 1}..{step}); the run is "
                                 "diverging. Lower the learning rate, check the data, or raise "
                                 "max_consecutive_skips (0 never stops)")
        return StepResult(kept_fraction=0.0, skipped=True, threshold=None, step=step)

    def _rule_context(self) -> RuleContext:
        """What the rule sees of this run (after construction's agreement has set the eligible count)."""
        backend = self.backend
        return RuleContext(config=self.config, stats=self.stats, weights=backend.abs_params,
                           parameters=backend.parameter_slices(), total_numel=backend.total_numel,
                           selection_comm=backend.selection_comm, agreement_comm=backend.agreement_comm,
                           generator=self.mask_generator)

    def mask_generator(self, step: int) -> torch.Generator:
        """The generator of step `step`'s random mask or scores: seeded by (seed, step) and, on a
        shard, the rank (replicas draw alike, so their masks agree)."""
        shard = 0 if isinstance(self.backend.selection_comm, LocalCommunicator) else self.backend.rank
        seed = derive_seed(-1 if self.config.seed is None else self.config.seed, step, -1, shard)
        return torch.Generator(device=self.backend.device).manual_seed(seed)

    def micro_step(self, last_in_pass: bool, last_in_step: bool):
        """Context for one chunk's forward+backward: reduce only on a pass's last chunk (DDP no_sync,
        FSDP2 gradient sync, DeepSpeed's accumulation boundary)."""
        return self.backend.micro_step(last_in_pass, last_in_step)

    def pass_rng(self, pass_index: int):
        """With `seed` set, pass j of step t draws dropout from seed (seed, t, j, rank); the caller's
        RNG state is restored afterwards. With seed None, the global RNG is used as is."""
        return self._rng(self.step_index, pass_index)

    @contextmanager
    def _rng(self, seed_step: int, pass_index: int) -> Iterator[None]:
        if self.config.seed is None:
            yield
            return
        device = self.backend.device
        devices = [device] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(derive_seed(self.config.seed, seed_step, pass_index, self.backend.rank))
            yield
