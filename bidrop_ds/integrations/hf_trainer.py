"""Bi-Drop inside the Hugging Face `Trainer`: `BiDropTrainerMixin` (for any Trainer subclass) and
`BiDropTrainer`.

One Bi-Drop step per optimizer step. The micro-batches of one gradient-accumulation window (the
Trainer's `gradient_accumulation_steps`) are the chunks of that step: `training_step` buffers the
first G-1 of them (no forward, no backward; it returns a zero loss for the running loss sum) and, at
the window's last micro-batch (the Trainer's own decision, `accelerator.sync_gradients`), runs the k
dropout passes over all G chunks.

- plain model / DDP / FSDP2: through the `BiDrop` hooks, so the masked mean is left in the `.grad`
  tensors and the Trainer's own clipping, `optimizer.step()` and LR scheduler apply to it once per
  window, exactly as they would to a vanilla gradient. Under DDP the chunks before the last of each
  pass run under `no_sync()` (each pass is all-reduced once); the Trainer's own `no_sync` only wraps
  the buffered micro-batches, which do no backward.
- DeepSpeed (`TrainingArguments(deepspeed=...)`, ZeRO 0-3): `BiDrop.step(chunks)` on the engine;
  `engine.step()` happens inside it, and the Trainer's later `optimizer.step()` and
  `lr_scheduler.step()` are accelerate's no-op DeepSpeed wrappers, so the engine steps once.

Each chunk's loss is what the vanilla Trainer would backpropagate for that micro-batch
(`compute_loss` with the window's `num_items_in_batch`, then its gradient-accumulation scaling), so
`k=1` is the vanilla Trainer. The kept fraction and the skipped-step count go into the training
logs; the plugin's state (`BiDrop.state_dict()`) is saved as `bidrop_state.json` in every checkpoint
and restored by `train(resume_from_checkpoint=...)`, so seeded runs continue the same pass sequence.

Resuming only ever starts from a complete checkpoint (`incomplete_trainer_checkpoint_reason`): with
`resume_from_checkpoint=True` the newest complete `checkpoint-N` of `output_dir`, newer incomplete ones
(a writer killed mid-save) skipped with a warning; `IncompleteCheckpointError` if every one is incomplete,
or if an explicitly named checkpoint is. A checkpoint about to be rewritten loses its old
`trainer_state.json` first, so a cut rewrite is incomplete too.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from bidrop_ds.backends.deepspeed_zero import is_deepspeed_engine
from bidrop_ds.bidrop import BiDrop, StepResult
from bidrop_ds.checkpoint import IncompleteCheckpointError, refuse_universal_round_robin
from bidrop_ds.config import BiDropConfig

logger = logging.getLogger(__name__)

STATE_NAME = "bidrop_state.json"
_CHECKPOINT_RE = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")  # the Trainer's checkpoint-N folders


def incomplete_trainer_checkpoint_reason(folder: str | os.PathLike) -> str | None:
    """None if the Trainer checkpoint `folder` is complete, else why not.

    The Trainer writes `trainer_state.json` last (after the weights, optimizer, scheduler, our
    `bidrop_state.json` and the RNG state), so a writer killed mid-save leaves it missing or
    truncated: complete means it parses and, for a `checkpoint-N` folder, says global_step N.
    `bidrop_state.json` is written before it, atomically: absent means the run did not save it (a
    vanilla or `save_only_model` checkpoint, which `train` resumes with a warning); present, it must parse.
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME}: its writer did not finish (killed mid-save?)"
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE_NAME} is unreadable ({err})"
    if not isinstance(state, dict):
        return f"{TRAINER_STATE_NAME} is not a JSON object"
    match = _CHECKPOINT_RE.fullmatch(folder.name)
    if match and "global_step" in state and state["global_step"] != int(match[1]):
        return f"{TRAINER_STATE_NAME} says global_step {state['global_step']}, not {match[1]}"
    try:
        json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as err:
        return f"{STATE_NAME} is unreadable ({err})"
    return None


def _trainer_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `directory`, highest N first (none if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    found = [p for p in Path(directory).iterdir() if _CHECKPOINT_RE.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.fullmatch(p.name)[1]), reverse=True)


def _complete_checkpoint(resume: str | bool | None, output_dir: str) -> str | bool | None:
    """`resume_from_checkpoint` as `Trainer.train` should get it: True becomes the newest complete
    `checkpoint-N` of `output_dir` (newer incomplete ones skipped, with a warning); an explicit folder must
    be complete. Raises `IncompleteCheckpointError` otherwise. True stays True when `output_dir` has no
    checkpoint folder, and a path that is no folder is passed on: the Trainer's own errors."""
    if resume is True:
        reasons = []
        for folder in _trainer_checkpoints(output_dir):
            reason = incomplete_trainer_checkpoint_reason(folder)
            if reason is None:
                for skipped, why in reasons:
                    logger.warning("BiDrop Trainer: skipping the incomplete checkpoint %s: %s", skipped, why)
                return str(folder)
            reasons.append((folder, reason))
        if reasons:
            raise IncompleteCheckpointError(
                f"BiDrop Trainer: no complete checkpoint to resume from in {output_dir}: "
                + "; ".join(f"{folder.name}: {why}" for folder, why in reasons))
    elif isinstance(resume, (str, os.PathLike)) and os.path.isdir(resume):
        reason = incomplete_trainer_checkpoint_reason(resume)
        if reason is not None:
            newest = next((str(folder) for folder in _trainer_checkpoints(Path(resume).parent)
                           if incomplete_trainer_checkpoint_reason(folder) is None), None)
            hint = f"the newest complete one beside it is {newest}" if newest else "none beside it is complete"
            raise IncompleteCheckpointError(f"BiDrop Trainer: refusing to resume from {resume}: {reason}; {hint}")
    return resume


class BiDropTrainerMixin:
    """Turns a `transformers.Trainer` (sub)class into a Bi-Drop trainer: `class T(BiDropTrainerMixin, MyTrainer)`.

    `bidrop_config` (keyword): a `BiDropConfig` (None: the defaults). After training starts,
    `self.bidrop` is the `BiDrop` object and `self.bidrop_last_result` the last step's `StepResult`.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse `class T(Trainer, BiDropTrainerMixin)`: the Trainer's training_step would win, silently."""
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(BiDropTrainerMixin):
            base = next(b for b in cls.__bases__ if issubclass(b, Trainer))
            raise TypeError(f"{cls.__name__}: put BiDropTrainerMixin before the Trainer class in the bases: "
                            f"class {cls.__name__}(BiDropTrainerMixin, {base.__name__})")

    def __init__(self, *args: Any, bidrop_config: BiDropConfig | None = None, **kwargs: Any) -> None:
        if bidrop_config is None:
            bidrop_config = BiDropConfig()
        if not isinstance(bidrop_config, BiDropConfig):
            hint = " (build one with BiDropConfig.from_dict(...))" if isinstance(bidrop_config, dict) else ""
            raise TypeError(f"{type(self).__name__}: bidrop_config must be a BiDropConfig, "
                            f"got {type(bidrop_config).__name__}{hint}")
        self.bidrop_config = bidrop_config
        self.bidrop: BiDrop | None = None
        self.bidrop_last_result: StepResult | None = None
        self._bidrop_chunks: list[dict[str, Any]] = []
        self._bidrop_kept: list[float] = []
        self._bidrop_resume_state: dict[str, Any] | None = None
        self._bidrop_resume_missing = False
        super().__init__(*args, **kwargs)

    # ----- train / resume ------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train` from a complete checkpoint only (see `_complete_checkpoint`), with the Bi-Drop
        state restored from its `bidrop_state.json`. Under DeepSpeed, resuming through universal-checkpoint
        loading with round_robin_gradients on ZeRO-1/2 is refused (`refuse_universal_round_robin`)."""
        self.bidrop = None  # created at the first training_step, on this call's model/optimizer/engine
        self.bidrop_last_result = None
        self._bidrop_chunks = []
        self._bidrop_kept = []
        self._bidrop_resume_state, self._bidrop_resume_missing = None, False
        resume_from_checkpoint = _complete_checkpoint(resume_from_checkpoint, self.args.output_dir)
        checkpoint = None if isinstance(resume_from_checkpoint, bool) else resume_from_checkpoint
        deepspeed_config = getattr(getattr(self.args, "hf_deepspeed_config", None), "config", None)
        if checkpoint is not None and deepspeed_config:
            zero = deepspeed_config.get("zero_optimization", {})
            universal = deepspeed_config.get("checkpoint", {}).get("load_universal", False)
            refuse_universal_round_robin("BiDrop Trainer", zero.get("stage", 0),
                                         zero.get("round_robin_gradients", False), universal)
        if checkpoint is not None:
            path = os.path.join(checkpoint, STATE_NAME)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    self._bidrop_resume_state = json.load(f)
            else:
                self._bidrop_resume_missing = True
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's save, after removing the `trainer_state.json` of a `checkpoint-N` about to be
        rewritten (a resumed run reaching step N again): it is the completeness mark, and a save cut
        short must not leave the old one vouching for half-new files."""
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            (folder / TRAINER_STATE_NAME).unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Every resumable checkpoint (not `save_only_model`) also gets the plugin's state."""
        super()._save_optimizer_and_scheduler(output_dir)
        state = self.bidrop.state_dict() if self.bidrop is not None else self._bidrop_resume_state
        if state is not None and self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            path = os.path.join(output_dir, STATE_NAME)
            with open(path + ".tmp", "w", encoding="utf-8") as f:  # a killed writer leaves no half file
                json.dump(state, f, indent=2)
            os.replace(path + ".tmp", path)

    # ----- the step ------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Buffer the window's micro-batches; at its last one, run the Bi-Drop step over all of them."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        self._bidrop_chunks.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:  # not the window's last micro-batch: no pass yet
            return torch.zeros((), device=self.args.device)
        chunks, self._bidrop_chunks = self._bidrop_chunks, []
        expected = getattr(self, "current_gradient_accumulation_steps", len(chunks))
        if len(chunks) != expected:
            raise RuntimeError(f"BiDrop Trainer: the accumulation window ended after {len(chunks)} micro-batch(es) "
                               f"but the Trainer announced {expected}; training_step must see every micro-batch")
        if self.bidrop is None:
            self.bidrop = self._bidrop_create(model)
        if is_deepspeed_engine(model):
            loss, result = self._bidrop_deepspeed_step(model, chunks, num_items_in_batch)
        else:
            loss, result = self._bidrop_hooks_step(model, chunks, num_items_in_batch)
        self.bidrop_last_result = result
        if not result.skipped:
            self._bidrop_kept.append(result.kept_fraction)
        return loss

    def _bidrop_chunk_loss(self, model: nn.Module, chunk: dict[str, Any], num_items_in_batch: Any,
                           chunks: int) -> torch.Tensor:
        """The loss the vanilla Trainer would backpropagate for this micro-batch (scaled for accumulation)."""
        with self.compute_loss_context_manager():
            # a copy: compute_loss may pop "labels", and every pass needs them
            loss = self.compute_loss(model, dict(chunk), num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()  # nn.DataParallel
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        return loss if scaled else loss / chunks

    def _bidrop_hooks_step(self, model: nn.Module, chunks: list[dict[str, Any]],
                           num_items_in_batch: Any) -> tuple[torch.Tensor, StepResult]:
        """Plain / DDP / FSDP2: the k passes with the hooks; the masked mean stays in the grads for the
        Trainer's clipping, optimizer step and scheduler."""
        bidrop, k = self.bidrop, self.bidrop_config.k
        bidrop.begin_step()  # re-attaches the gradient views the Trainer's model.zero_grad() dropped
        total = torch.zeros((), device=self.args.device)
        for pass_index in range(k):
            with bidrop.pass_rng(pass_index):
                for index, chunk in enumerate(chunks):
                    last_in_pass = index == len(chunks) - 1
                    with bidrop.micro_step(last_in_pass, last_in_pass and pass_index == k - 1):
                        loss = self._bidrop_chunk_loss(model, chunk, num_items_in_batch, len(chunks))
                        self.accelerator.backward(loss)
                    total += loss.detach().to(total.device, total.dtype)
            bidrop.fold_pass()
        scaler = getattr(self.accelerator, "scaler", None)
        result = bidrop.apply_mask(grad_scale=float(scaler.get_scale()) if scaler is not None else None)
        if result.skipped and scaler is not None:
            # The grads are None, so the optimizer would not move; a GradScaler, however, wants to have
            # seen an inf: give it one, so that it skips the step and backs its scale off.
            param = next(p for p in model.parameters() if p.requires_grad)
            param.grad = torch.full_like(param, float("inf"))
        return total / k, result

    def _bidrop_deepspeed_step(self, engine: nn.Module, chunks: list[dict[str, Any]],
                               num_items_in_batch: Any) -> tuple[torch.Tensor, StepResult]:
        """DeepSpeed: BiDrop drives the engine (k x G micro-steps, then one engine.step())."""
        n = len(chunks)

        def loss_fn(model: nn.Module, chunk: dict[str, Any]) -> torch.Tensor:
            # engine.backward divides by gradient_accumulation_steps (= n): undo the Trainer's own
            # scaling by the same n, so the gradient is the vanilla Trainer's
            return self._bidrop_chunk_loss(model, chunk, num_items_in_batch, n) * n

        result = self.bidrop.step(chunks, loss_fn=loss_fn)
        return torch.tensor(result.loss, device=self.args.device), result

    def _bidrop_create(self, model: nn.Module) -> BiDrop:
        """The BiDrop object, on the model the Trainer trains (the engine under DeepSpeed)."""
        if getattr(self, "is_fsdp_enabled", False) and not _is_fsdp2(self):
            raise NotImplementedError("BiDrop Trainer: FSDP1 (FullyShardedDataParallel) is not supported; "
                                      "use FSDP2 (fsdp_config version 2; transformers 4.x ignores it: "
                                      "FSDP_VERSION=2), DeepSpeed ZeRO or DDP")
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and any(getattr(pc, f"{kind}_enabled", False) for kind in ("cp", "sp", "tp")):
            raise NotImplementedError("BiDrop Trainer: context, sequence and tensor parallelism are not supported")
        if self.args.optim in ("lomo", "adalomo"):
            raise NotImplementedError("BiDrop Trainer: LOMO optimizers step inside backward; Bi-Drop needs "
                                      "all k passes before the step")
        if is_deepspeed_engine(model):
            self._bidrop_check_deepspeed_windows(model)
            bidrop = BiDrop(model, config=self.bidrop_config)
        else:
            optimizer = self.optimizer
            while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
                optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer
            bidrop = BiDrop(model, optimizer, self.bidrop_config)
        if self._bidrop_resume_state is not None:
            saved = self._bidrop_resume_state.get("config")
            if saved is not None and saved != self.bidrop_config.to_dict():
                logger.warning("BiDrop Trainer: resuming with a Bi-Drop config that differs from the checkpoint's "
                               "(%s, now %s)", saved, self.bidrop_config.to_dict())
            bidrop.load_state_dict(self._bidrop_resume_state)
        elif self._bidrop_resume_missing:
            logger.warning("BiDrop Trainer: the checkpoint has no %s (not a Bi-Drop run?); the step counter "
                           "continues from the Trainer's global step %d", STATE_NAME, self.state.global_step)
            bidrop.load_state_dict({"step_index": self.state.global_step, "skipped_steps": 0})
        return bidrop

    def _bidrop_check_deepspeed_windows(self, engine: nn.Module) -> None:
        """Under DeepSpeed every Bi-Drop step needs exactly gradient_accumulation_steps chunks; an epoch
        whose micro-batches do not fill whole windows would end in a short one: refuse before training."""
        gas = self.args.gradient_accumulation_steps
        loader = getattr(self.callback_handler, "train_dataloader", None)
        try:
            per_epoch = len(loader)
        except TypeError:
            return  # an iterable dataset: a short window, if any, is refused by BiDrop when it comes
        full, rest = divmod(per_epoch, gas)
        if rest and self.state.max_steps > full:
            raise ValueError(
                f"BiDrop Trainer under DeepSpeed: an epoch has {per_epoch} micro-batches per rank, which is not a "
                f"multiple of gradient_accumulation_steps={gas}, so its last accumulation window would have "
                f"{rest}; a Bi-Drop step on a DeepSpeed engine needs exactly {gas} chunks. Make the micro-batches "
                f"per epoch a multiple of {gas} (training set size, per_device_train_batch_size, "
                f"dataloader_drop_last=True) or set max_steps <= {full}.")

    # ----- logging -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs also get `bidrop_kept_fraction` (mean over the steps since the last log, skipped
        steps left out; absent if all were skipped) and `bidrop_skipped_steps` (so far)."""
        if self.bidrop is not None and ("loss" in logs or "train_loss" in logs):
            if "loss" in logs and self._bidrop_kept:
                logs["bidrop_kept_fraction"] = sum(self._bidrop_kept) / len(self._bidrop_kept)
            if "loss" in logs:
                self._bidrop_kept = []
            logs["bidrop_skipped_steps"] = self.bidrop.skipped_steps
        return super().log(logs, *args, **kwargs)


def _is_fsdp2(trainer: Any) -> bool:
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", 1) == 2


class BiDropTrainer(BiDropTrainerMixin, Trainer):
    """`transformers.Trainer` with Bi-Drop: `BiDropTrainer(model, args, ..., bidrop_config=BiDropConfig(...))`."""
