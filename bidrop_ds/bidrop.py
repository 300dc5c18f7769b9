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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from bidrop_ds.backends.deepspeed_zero import is_deepspeed_engine
from bidrop_ds.backends.fsdp2 import Fsdp2Backend, is_fsdp2_model
from bidrop_ds.backends.torch_ddp import TorchBackend
from bidrop_ds.config import BiDropConfig
from bidrop_ds.core import PassStatistics, global_threshold, kept_count, scores_into_m2

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


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, pass, rank), stable across platforms and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BiDrop:
    """Bi-Drop on a model and its optimizer (plain nn.Module or DDP-wrapped)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 config: BiDropConfig | None = None) -> None:
        self.config = config if config is not None else BiDropConfig()
        if not isinstance(self.config, BiDropConfig):
            raise TypeError(f"BiDrop: config must be a BiDropConfig, got {type(self.config).__name__}")
        self.model = model
        self.backend = self._make_backend(model, optimizer)
        self.stats = PassStatistics(self.backend.numel, device=self.backend.device)
        self.masking = self.config.k > 1 and self.config.p < 1.0
        self.n = kept_count(self.config.p, self.backend.total_numel)
        self.step_index = 0  # steps begun so far; seeds the passes of seeded runs
        self.skipped_steps = 0
        self._in_step = False
        self.backend.begin_step()

    def _make_backend(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        if is_deepspeed_engine(model):
            if optimizer is not None:
                raise ValueError("BiDrop(engine, config=...): a DeepSpeed engine brings its own optimizer; "
                                 "do not pass one")
            from bidrop_ds.backends.deepspeed_zero import DeepSpeedBackend

            return DeepSpeedBackend(model, self.config)
        if optimizer is None:
            raise ValueError("BiDrop(model, optimizer, config): a plain, DDP or FSDP2 model needs its optimizer")
        if is_fsdp2_model(model):
            return Fsdp2Backend(model, optimizer, self.config)
        return TorchBackend(model, optimizer, self.config)

    # ----- the hooks -------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Start a step: zero the gradients and the statistics."""
        self.backend.begin_step()
        self.stats.reset()
        self._in_step = True

    def fold_pass(self) -> None:
        """After a pass's backward(s): fold its reduced gradient into the statistics, reset it."""
        if not self._in_step:
            raise RuntimeError("BiDrop.fold_pass() called outside a step; call begin_step() first")
        if self.stats.count >= self.config.k:
            raise RuntimeError(f"BiDrop.fold_pass(): already {self.stats.count} passes, config.k = {self.config.k}")
        self.stats.update(self.backend.pass_gradient())
        self.backend.end_pass()

    def apply_mask(self, grad_scale: float | None = None) -> StepResult:
        """After the k passes: decide the mask and write the final gradient (before optimizer.step()).

        `grad_scale` is the factor the gradients carry (e.g. a GradScaler's loss scale; None: the
        backend's own, i.e. DeepSpeed's fp16 loss scale, else 1), so that the mask is that of the
        unscaled gradients; the written gradient keeps the scale.
        If any statistic is non-finite on any rank, every rank skips: all grads are set to None so
        that the optimizer's step touches neither parameters nor state.
        """
        if not self._in_step or self.stats.count != self.config.k:
            raise RuntimeError(f"BiDrop.apply_mask() after {self.stats.count} folded passes; "
                               f"config.k = {self.config.k} (call fold_pass() after each pass)")
        self._in_step = False
        step = self.step_index
        self.step_index += 1
        if grad_scale is None:
            grad_scale = self.backend.grad_scale()
        finite = self.stats.is_finite() and self.backend.others_finite()
        threshold = None
        if self.masking:
            generator = None
            if self.config.score == "random":
                seed = derive_seed(-1 if self.config.seed is None else self.config.seed, step, -1)
                generator = torch.Generator(device=self.backend.device).manual_seed(seed)
            scores = scores_into_m2(self.stats, self.backend.abs_params(), self.config.score,
                                    self.config.eps, generator, grad_scale)
            self.backend.mark_ineligible(scores, -1.0)  # negative: not a candidate
            found = global_threshold(scores, self.n, self.backend.selection_comm, not finite)
            finite = finite and found is not None
        if not (self.masking and self.backend.selection_comm is self.backend.agreement_comm):
            finite = self._all_ranks_agree(finite)  # the selection did not already carry the flag
        if not finite:
            return self._skip(step)
        update = self.stats.mean
        kept = self.backend.total_numel
        if self.masking:  # k = 1 or p = 1 is vanilla: no mask, no rescale
            threshold, kept = found.value, found.kept
            if self.config.rescale:  # the kept eligible elements only (ineligible ones score -1)
                torch.where(scores >= threshold, update / self.config.p, update, out=update)
            self.backend.mark_ineligible(scores, float("inf"))  # ineligible: always kept
            update.masked_fill_(scores < threshold, 0.0)
        self.backend.write_gradients(update, self.config.k)
        return StepResult(kept_fraction=kept / self.backend.total_numel, skipped=False,
                          threshold=threshold, step=step)

    # ----- the whole step --------------------------------------------------------------------
    def step(self, batch_or_chunks: Batch | Sequence[Batch], loss_fn: LossFn | None = None) -> StepResult:
        """One Bi-Drop step on a batch (or a list of micro-batch chunks of it).

        Each of the k passes runs forward+backward per chunk (loss / chunks, so equal chunks give
        the batch's gradient); then the mask, `optimizer.step()` (unless skipped), zeroed grads.
        """
        chunks = list(batch_or_chunks) if isinstance(batch_or_chunks, (list, tuple)) else [batch_or_chunks]
        if not chunks:
            raise ValueError("BiDrop.step: got an empty list of chunks")
        self.backend.check_chunks(len(chunks))
        self.begin_step()
        losses = []
        for pass_index in range(self.config.k):
            with self.pass_rng(pass_index):
                for chunk_index, chunk in enumerate(chunks):
                    last_in_pass = chunk_index == len(chunks) - 1
                    with self.micro_step(last_in_pass, last_in_pass and pass_index == self.config.k - 1):
                        loss = loss_fn(self.model, chunk) if loss_fn is not None else self.model(**chunk).loss
                        self.backend.backward(loss, len(chunks))
                    losses.append(loss.detach())
            self.fold_pass()
        result = self.apply_mask()
        if not result.skipped:
            self.backend.optimizer_step()
        self.backend.zero_grad()
        mean_loss = torch.stack(losses).float().mean().item()
        return StepResult(kept_fraction=result.kept_fraction, skipped=result.skipped,
                          threshold=result.threshold, step=result.step, loss=mean_loss)

    # ----- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The plugin's own state (the mask is step-wise; only counters persist)."""
        return {"step_index": self.step_index, "skipped_steps": self.skipped_steps,
                "config": self.config.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_index = int(state["step_index"])
        self.skipped_steps = int(state["skipped_steps"])

    # ----- internals ----------------------------------------------------------------------------
    def _skip(self, step: int) -> StepResult:
        self.skipped_steps += 1
        self.backend.skip_step()
        logger.warning("Bi-Drop step %d skipped: non-finite gradient in some pass on some rank "
                       "(%d skipped so far)", step, self.skipped_steps)
        return StepResult(kept_fraction=0.0, skipped=True, threshold=None, step=step)

    def _all_ranks_agree(self, finite: bool) -> bool:
        flag = torch.tensor([0 if finite else 1], dtype=torch.int64, device=self.backend.device)
        self.backend.agreement_comm.all_reduce_sum(flag)
        return int(flag.item()) == 0

    def micro_step(self, last_in_pass: bool, last_in_step: bool):
        """Context for one chunk's forward+backward: reduce only on a pass's last chunk (DDP no_sync,
        FSDP2 gradient sync, DeepSpeed's accumulation boundary)."""
        return self.backend.micro_step(last_in_pass, last_in_step)

    @contextmanager
    def pass_rng(self, pass_index: int) -> Iterator[None]:
        """With `seed` set, pass j of step t draws dropout from seed (seed, t, j, rank); the caller's
        RNG state is restored afterwards. With seed None, the global RNG is used as is."""
        if self.config.seed is None:
            yield
            return
        device = self.backend.device
        devices = [device] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(derive_seed(self.config.seed, self.step_index, pass_index, self.backend.rank))
            yield
