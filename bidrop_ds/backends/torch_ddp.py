"""Backend for a plain nn.Module or a DistributedDataParallel-wrapped one.

The eligible parameters' gradients are made views of one flat buffer, so autograd (and DDP's
reducer, which copies the averaged bucket into `p.grad`) accumulate straight into it and each pass
is folded in by a single vectorised op. Every rank holds the whole model, so every rank scores all
elements and selects locally; the masks are identical because the reduced gradients are. Other
trainable parameters accumulate the sum of the passes in their own `.grad` and get the mean.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bidrop_ds.backends.partition import ParameterSlice
from bidrop_ds.comm import ProcessGroupCommunicator
from bidrop_ds.config import BiDropConfig
from bidrop_ds.core import Communicator, LocalCommunicator


class TorchBackend:
    """Gradients held whole on every rank (single process or DDP)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: BiDropConfig) -> None:
        self.model = model
        self.optimizer = optimizer
        self.is_ddp = isinstance(model, DistributedDataParallel)
        module = model.module if self.is_ddp else model
        named = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
        self.eligible = [param for name, param in named if config.is_eligible(name)]
        self.eligible_names = [name for name, _ in named if config.is_eligible(name)]
        self.others = [param for name, param in named if not config.is_eligible(name)]
        if not self.eligible:
            raise ValueError(
                f"BiDrop: include={list(config.include)} / exclude={list(config.exclude)} select no "
                f"trainable parameter of {type(module).__name__} (names look like {named[0][0]!r}); "
                "adjust the patterns" if named else f"BiDrop: {type(module).__name__} has no trainable parameter")
        kinds = {(param.dtype, param.device) for param in self.eligible}
        if len(kinds) > 1:
            raise ValueError(f"BiDrop: eligible parameters mix dtypes/devices {sorted(map(str, kinds))}; "
                             "the torch backend needs one dtype and one device")
        (dtype, self.device), = kinds
        self.numel = sum(param.numel() for param in self.eligible)
        self.held_numel = self.total_numel = self.numel  # every rank owns (and selects over) all eligible elements
        self.flat_grad = torch.zeros(self.numel, dtype=dtype, device=self.device)
        self.grad_views = []
        offset = 0
        for param in self.eligible:
            self.grad_views.append(self.flat_grad[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.selection_comm: Communicator = LocalCommunicator()
        # Ranks could only disagree on skipping through a bug, but the decision is still collective.
        self.agreement_comm: Communicator = (ProcessGroupCommunicator() if self.world_size > 1
                                             else LocalCommunicator())

    def parameter_slices(self) -> list[ParameterSlice]:
        """Each eligible parameter and its range in the flat buffer (every rank holds all of it)."""
        out, offset = [], 0
        for name, param in zip(self.eligible_names, self.eligible):
            out.append(ParameterSlice(name, param.numel(), ((offset, offset + param.numel()),)))
            offset += param.numel()
        return out

    own_bytes = 0  # the flat buffer is the eligible parameters' .grad storage, not an extra

    def check_chunks(self, chunks: int) -> None:
        """Any number of chunks works: each pass averages them."""

    def begin_step(self) -> None:
        """Zero every gradient and (re)attach the flat-buffer views (an outside zero_grad may drop them)."""
        self.flat_grad.zero_()
        for param, view in zip(self.eligible, self.grad_views):
            param.grad = view
        for param in self.others:
            param.grad = None

    @contextmanager
    def micro_step(self, last_in_pass: bool, last_in_step: bool) -> Iterator[None]:
        """Under DDP, reduce once per pass: chunks before the last accumulate locally (no_sync)."""
        with (nullcontext() if last_in_pass or not self.is_ddp else self.model.no_sync()):
            yield

    def backward(self, loss: torch.Tensor, chunks: int) -> None:
        """Backward of one chunk's loss, divided by the chunk count so a pass averages its chunks."""
        (loss if chunks == 1 else loss / chunks).backward()

    def pass_gradient(self) -> torch.Tensor:
        """This pass's reduced gradient of the eligible elements, flat (valid until `end_pass`)."""
        for param, view in zip(self.eligible, self.grad_views):
            if param.grad is None or param.grad.data_ptr() != view.data_ptr():
                raise RuntimeError("BiDrop: an eligible parameter's .grad was replaced during the step "
                                   "(zero_grad or a hook between passes?); call begin_step() first")
        return self.flat_grad

    def end_pass(self) -> None:
        self.flat_grad.zero_()

    def abs_params(self) -> list[torch.Tensor]:
        """The eligible weights, in the flat layout's order (no copy; the scores take |theta|)."""
        return [param.detach() for param in self.eligible]

    def others_finite(self) -> bool:
        grads = [param.grad for param in self.others if param.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())

    def write_update(self, eligible_update: torch.Tensor) -> None:
        """Eligible grads := the (masked) update."""
        self.flat_grad.copy_(eligible_update)

    def finish_others(self, passes: int) -> None:
        """The other trainable grads := the mean of their pass sum."""
        grads = [param.grad for param in self.others if param.grad is not None]
        if grads and passes > 1:
            torch._foreach_div_(grads, float(passes))

    def grad_scale(self) -> float:
        return 1.0  # a loss scale of the user's own (GradScaler) is passed to apply_mask

    def skip_step(self) -> None:
        """Set every grad to None, so that an optimizer step leaves all parameters and state alone."""
        for param in self.eligible + self.others:
            param.grad = None

    def discard_gradients(self) -> None:
        """Drop this pass's gradients without an optimizer step (Fisher estimation batches)."""
        self.skip_step()

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.begin_step()
