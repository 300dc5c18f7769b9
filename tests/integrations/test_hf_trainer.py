"""BiDropTrainer (Hugging Face Trainer integration): real Trainer runs on a tiny config-built BERT, CPU, no
downloads. In one process: the first optimizer step equals a hand-run `BiDrop.step(chunks)`, k=1 is the vanilla
Trainer bit for bit, a resumed run ends where the uninterrupted one does (also when `resume_from_checkpoint=True`
must skip a newest checkpoint whose writer was killed; incomplete checkpoints are refused), a non-finite step is
skipped, misuse errors; 6 steps follow an independent reference replica (tests/reference.py) at every step,
across a skipped step and a save and resume through the Trainer's checkpoints in the middle. On 2 real ranks
(torchrun, gloo; this file is also the rank script): DeepSpeed ZeRO-2 and ZeRO-3 (fp32), DDP and (forced on CPU)
FSDP2 train 4 steps, every one in lockstep with the reference, and their first step equals a hand-run BiDrop fed
the same chunks; under DDP each pass is all-reduced once.

About the loss scaling: BERT's classification forward takes **kwargs, so the Trainer passes it
`num_items_in_batch` and counts its loss as already scaled for gradient accumulation, although BERT's loss is a
plain mean (transformers' rule, not ours: the vanilla Trainer does the same). BiDropTrainer backpropagates exactly
what the vanilla Trainer would; to compare with a hand-run BiDrop (chunk losses / chunks), the tests that do so set
`model_accepts_loss_kwargs = False`, so the Trainer divides each micro-batch's loss by the window size.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import Trainer, TrainerCallback, TrainingArguments

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.checkpoint import IncompleteCheckpointError
from bidrop_ds.comm import close_process_group
from bidrop_ds.integrations.hf_trainer import (STATE_NAME, BiDropTrainer, BiDropTrainerMixin,
                                               incomplete_trainer_checkpoint_reason)
from tests.models import random_batch, tiny_bert
from tests.launching import run_in_session
from tests.reference import Reference, held_weights, lockstep, record_reads

ROOT = Path(__file__).resolve().parents[2]
LR = 1e-3
# transformers 4.x logs the loss rounded to 4 decimals (5.x as computed): there a logged loss holds only to one
# unit of the 4th decimal (a rounded value against an exact one, or two values rounded either side of a boundary)
LOGGED_LOSS_ABS = 1e-4 if Version(transformers.__version__).major < 5 else 0.0


class Rows(torch.utils.data.Dataset):
    """n labelled rows of random token ids (the tiny BERT's vocabulary)."""

    def __init__(self, n: int = 32, seed: int = 0) -> None:
        batch = random_batch(seed, size=n)
        self.rows = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


class RecordingTrainer(BiDropTrainer):
    """Keeps a copy of every micro-batch training_step receives (to replay the same chunks by hand)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", [])
        self.seen.append({key: value.detach().clone() for key, value in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def training_args(output_dir: Path | str, **overrides) -> TrainingArguments:
    """Constant LR, no warm-up, no clipping, log every step, CPU, quiet."""
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  max_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                  dataloader_num_workers=0, dataloader_pin_memory=False, use_cpu=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def approx_logged_loss(expected: float | list[float]) -> object:
    """What a loss the Trainer logged must equal: `expected` to 1e-6 relative, or LOGGED_LOSS_ABS on 4.x."""
    return pytest.approx(expected, rel=1e-6, abs=LOGGED_LOSS_ABS)


# ----- one process -------------------------------------------------------------------------------

def test_first_step_equals_hand_run_bidrop(tmp_path: Path) -> None:
    config = BiDropConfig(k=2, p=0.3, seed=5)
    model = tiny_bert(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    trainer = RecordingTrainer(model=model, args=training_args(tmp_path), train_dataset=Rows(),
                               optimizers=(optimizer, None), bidrop_config=config)
    trainer.model_accepts_loss_kwargs = False  # see the module docstring
    trainer.train()

    hand_model = tiny_bert(0)
    hand = BiDrop(hand_model, torch.optim.AdamW(hand_model.parameters(), lr=LR), config)
    assert len(trainer.seen) == 2  # one window of 2 micro-batches = the 2 chunks of one Bi-Drop step
    expected = hand.step(trainer.seen)
    for got, want in zip(model.parameters(), hand_model.parameters()):
        assert torch.equal(got, want)
    # the Trainer stepped its optimizer exactly once, on the masked gradient
    assert {int(state["step"]) for state in optimizer.state.values()} == {1}
    assert trainer.bidrop.step_index == 1 and trainer.bidrop_last_result.kept_fraction == expected.kept_fraction

    step_log = next(log for log in trainer.state.log_history if "loss" in log)
    assert step_log["bidrop_kept_fraction"] == pytest.approx(0.3, abs=1e-3)
    assert step_log["bidrop_kept_fraction"] == expected.kept_fraction
    assert step_log["bidrop_skipped_steps"] == 0
    assert step_log["loss"] == approx_logged_loss(expected.loss)  # mean over passes and chunks


def test_k1_is_the_vanilla_trainer(tmp_path: Path) -> None:
    """k=1 with the Trainer's own loss rules (no override), 2 windows of 2 micro-batches, Trainer clipping on."""
    args = training_args(tmp_path, max_steps=2, max_grad_norm=0.05)
    finals = []
    for make in (lambda m: Trainer(model=m, args=args, train_dataset=Rows()),
                 lambda m: BiDropTrainer(model=m, args=args, train_dataset=Rows(), bidrop_config=BiDropConfig(k=1))):
        model = tiny_bert(0)
        trainer = make(model)
        trainer.train()
        finals.append((params(model), [log["loss"] for log in trainer.state.log_history if "loss" in log]))
    (vanilla, vanilla_losses), (bidrop, bidrop_losses) = finals
    assert all(torch.equal(a, b) for a, b in zip(vanilla, bidrop))
    assert bidrop_losses == approx_logged_loss(vanilla_losses)


def test_resume_continues_the_seeded_run(tmp_path: Path) -> None:
    """4 steps straight, against 2 steps + checkpoint-2 + a new trainer resumed from it (AdamW, shuffled data)."""
    config = BiDropConfig(k=2, p=0.3, seed=11)

    def run(output_dir: Path, resume: str | None = None) -> tuple[BiDropTrainer, torch.nn.Module]:
        model = tiny_bert(0)
        args = training_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = BiDropTrainer(model=model, args=args, train_dataset=Rows(), bidrop_config=config)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    straight, straight_model = run(tmp_path / "straight")
    saved = json.loads((tmp_path / "straight" / "checkpoint-2" / STATE_NAME).read_text())
    assert saved == {"step_index": 2, "skipped_steps": 0, "consecutive_skips": 0, "config": config.to_dict(),
                     "strategy": {}}
    resumed, resumed_model = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert resumed.bidrop.step_index == straight.bidrop.step_index == 4
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    # a checkpoint of the resumed run carries on the counter
    assert json.loads((tmp_path / "resumed" / "checkpoint-4" / STATE_NAME).read_text())["step_index"] == 4
    # without the state file (e.g. a vanilla checkpoint) it still continues from the Trainer's step, with a warning
    (tmp_path / "straight" / "checkpoint-2" / STATE_NAME).unlink()
    again, again_model = run(tmp_path / "again", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert again.bidrop.step_index == 4
    assert all(torch.equal(a, b) for a, b in zip(straight_model.parameters(), again_model.parameters()))


TRAINER_STATE = "trainer_state.json"  # the Trainer's, written last in every checkpoint
SAVED_CONFIG = BiDropConfig(k=2, p=0.3, seed=11)


def saving_args(output_dir: Path) -> TrainingArguments:
    return training_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[torch.Tensor]]:
    """A seeded 4-step run that saved checkpoint-2 and checkpoint-4, and its final weights. Tests spoil a copy."""
    out = tmp_path_factory.mktemp("saved") / "run"
    model = tiny_bert(0)
    BiDropTrainer(model=model, args=saving_args(out), train_dataset=Rows(), bidrop_config=SAVED_CONFIG).train()
    return out, params(model)


def copy_run(saved_run: tuple[Path, list[torch.Tensor]], tmp_path: Path) -> Path:
    shutil.copytree(saved_run[0], tmp_path / "run")
    return tmp_path / "run"


def test_resume_true_skips_an_incomplete_newest_checkpoint(saved_run, tmp_path: Path, caplog) -> None:
    """checkpoint-4's writer killed before trainer_state.json: resume=True takes checkpoint-2 (with a warning naming
    checkpoint-4) and ends where the uninterrupted run did; the model starts from other weights, so only loading
    checkpoint-2 gets there."""
    out = copy_run(saved_run, tmp_path)
    (out / "checkpoint-4" / TRAINER_STATE).unlink()
    model = tiny_bert(1)
    trainer = RecordingTrainer(model=model, args=saving_args(out), train_dataset=Rows(), bidrop_config=SAVED_CONFIG)
    with caplog.at_level(logging.WARNING, logger="bidrop_ds.integrations.hf_trainer"):
        trainer.train(resume_from_checkpoint=True)
    assert len(trainer.seen) == 4  # steps 3 and 4 only, 2 micro-batches each
    assert trainer.state.global_step == trainer.bidrop.step_index == 4
    assert all(torch.equal(a, b) for a, b in zip(saved_run[1], model.parameters()))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"incomplete checkpoint {out / 'checkpoint-4'}: no {TRAINER_STATE}" in m for m in warnings), warnings
    assert incomplete_trainer_checkpoint_reason(out / "checkpoint-4") is None  # saved again, complete


def test_a_cut_rewrite_of_a_checkpoint_is_not_taken_for_complete(saved_run, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed from checkpoint-2, the run saves checkpoint-4 again and dies while writing the weights: the old
    trainer_state.json (step 4) must not vouch for the half-new folder."""
    out = copy_run(saved_run, tmp_path)
    trainer = BiDropTrainer(model=tiny_bert(1), args=saving_args(out), train_dataset=Rows(),
                            bidrop_config=SAVED_CONFIG)
    original = trainer.save_model

    def dies_at_step_4(*args, **kwargs):
        original(*args, **kwargs)
        if trainer.state.global_step == 4:
            raise KeyboardInterrupt("killed after the weights")

    monkeypatch.setattr(trainer, "save_model", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert incomplete_trainer_checkpoint_reason(out / "checkpoint-4") == \
        f"no {TRAINER_STATE}: its writer did not finish (killed mid-save?)"
    assert incomplete_trainer_checkpoint_reason(out / "checkpoint-2") is None


def test_explicit_incomplete_checkpoint_is_refused(saved_run, tmp_path: Path) -> None:
    """Not the Trainer's crash on the missing trainer_state.json (after loading the weights): a clear refusal that
    names the folder, the reason and the newest complete checkpoint beside it."""
    out = copy_run(saved_run, tmp_path)
    (out / "checkpoint-4" / TRAINER_STATE).unlink()
    model = tiny_bert(1)
    before = params(model)
    trainer = BiDropTrainer(model=model, args=saving_args(tmp_path / "new"), train_dataset=Rows(),
                            bidrop_config=SAVED_CONFIG)
    with pytest.raises(IncompleteCheckpointError,
                       match=rf"refusing to resume from {re.escape(str(out / 'checkpoint-4'))}: no {TRAINER_STATE}: "
                             rf".*the newest complete one beside it is {re.escape(str(out / 'checkpoint-2'))}$"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert trainer.state.global_step == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_no_complete_checkpoint(saved_run, tmp_path: Path) -> None:
    """Every checkpoint incomplete: resume=True refuses, naming each and why; no checkpoint at all stays the
    Trainer's own error. Then the other ways to be (in)complete, folder by folder."""
    out = copy_run(saved_run, tmp_path)
    (out / "checkpoint-4" / TRAINER_STATE).unlink()
    state = (out / "checkpoint-2" / TRAINER_STATE).read_text()
    (out / "checkpoint-2" / TRAINER_STATE).write_text(state[: len(state) // 2])  # killed mid-write
    trainer = BiDropTrainer(model=tiny_bert(0), args=saving_args(out), train_dataset=Rows(),
                            bidrop_config=SAVED_CONFIG)
    with pytest.raises(IncompleteCheckpointError,
                       match=rf"no complete checkpoint to resume from in {re.escape(str(out))}: checkpoint-4: no "
                             rf"{TRAINER_STATE}: .*; checkpoint-2: {TRAINER_STATE} is unreadable"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0
    (tmp_path / "empty").mkdir()
    trainer.args.output_dir = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="No valid checkpoint found in output directory"):
        trainer.train(resume_from_checkpoint=True)

    def variant(name: str, source: str = "checkpoint-2") -> Path:
        shutil.copytree(saved_run[0] / source, tmp_path / name)
        return tmp_path / name

    assert incomplete_trainer_checkpoint_reason(saved_run[0] / "checkpoint-2") is None
    assert incomplete_trainer_checkpoint_reason(variant("checkpoint-6")) == f"{TRAINER_STATE} says global_step 2, not 6"
    (variant("checkpoint-4", "checkpoint-4") / STATE_NAME).write_text("{")
    assert incomplete_trainer_checkpoint_reason(tmp_path / "checkpoint-4").startswith(f"{STATE_NAME} is unreadable")
    only_model = variant("renamed")  # a save_only_model or vanilla checkpoint (and no step in the name): complete
    for name in (STATE_NAME, "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (only_model / name).unlink()
    assert incomplete_trainer_checkpoint_reason(only_model) is None


def test_short_last_window_and_mixin(tmp_path: Path) -> None:
    """The mixin on a Trainer subclass; 3 micro-batches with gradient_accumulation_steps=2 make a last window
    of 1 (fine outside DeepSpeed: any number of chunks)."""
    class Custom(Trainer):
        pass

    class Mixed(BiDropTrainerMixin, Custom):
        pass

    model = tiny_bert(0)
    trainer = Mixed(model=model, args=training_args(tmp_path, max_steps=-1, num_train_epochs=1),
                    train_dataset=Rows(n=12), bidrop_config=BiDropConfig(k=2, p=0.5))
    before = params(model)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.bidrop.step_index == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    kept = [log["bidrop_kept_fraction"] for log in trainer.state.log_history if "loss" in log]
    assert kept == pytest.approx([0.5, 0.5], abs=1e-3)


def test_misuse(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"bidrop_config must be a BiDropConfig, got dict .*from_dict"):
        BiDropTrainer(model=tiny_bert(0), args=training_args(tmp_path), train_dataset=Rows(),
                      bidrop_config={"k": 2})
    with pytest.raises(TypeError, match=r"WrongOrder: put BiDropTrainerMixin before the Trainer class in the bases: "
                                        r"class WrongOrder\(BiDropTrainerMixin, Trainer\)"):
        class WrongOrder(Trainer, BiDropTrainerMixin):
            pass

    trainer = BiDropTrainer(model=tiny_bert(0, dropout=0.0),
                            args=training_args(tmp_path, gradient_accumulation_steps=1),
                            train_dataset=Rows(), bidrop_config=BiDropConfig(k=2))
    with pytest.raises(ValueError, match="no dropout module with p > 0.*allow_no_dropout=True"):
        trainer.train()
    # under DeepSpeed an epoch must fill whole accumulation windows (checked before the first step)
    trainer = BiDropTrainer(model=tiny_bert(0), args=training_args(tmp_path), train_dataset=Rows(),
                            bidrop_config=BiDropConfig())
    trainer.callback_handler.train_dataloader = [None] * 5  # 5 micro-batches, gradient_accumulation_steps=2
    trainer.state.max_steps = 2
    trainer._bidrop_check_deepspeed_windows(None)  # the short third window is never reached
    trainer.state.max_steps = 3
    with pytest.raises(ValueError, match=r"5 micro-batches per rank.*last accumulation window would have 1.*"
                                         r"set max_steps <= 2"):
        trainer._bidrop_check_deepspeed_windows(None)


def test_non_finite_step_is_skipped(tmp_path: Path) -> None:
    """A NaN in the first window: parameters and AdamW state untouched, the skip counted and logged; the next
    window trains."""

    class NaNOnce(BiDropTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            loss = super().compute_loss(model, inputs, **kwargs)
            return loss * float("nan") if self.state.global_step == 0 else loss

    model = tiny_bert(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    trainer = NaNOnce(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=Rows(),
                      optimizers=(optimizer, None), bidrop_config=BiDropConfig(k=2, p=0.3, seed=0))
    initial = params(model)
    trainer.train()
    assert trainer.bidrop.skipped_steps == 1 and trainer.bidrop.step_index == 2
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert "bidrop_kept_fraction" not in logs[0] and logs[0]["bidrop_skipped_steps"] == 1
    assert logs[1]["bidrop_kept_fraction"] == pytest.approx(0.3, abs=1e-3)
    # one real AdamW step: state step 1 (the skipped window did not count); no weight moved by more than
    # ~lr (+ weight decay)
    assert {int(state["step"]) for state in optimizer.state.values()} == {1}
    assert max((a - b).abs().max().item() for a, b in zip(initial, model.parameters())) <= 1.05 * LR  # not 2 x lr


# ----- lockstep with an independent reference (tests/reference.py) ---------------------------------

class LockstepTrainer(RecordingTrainer):
    """Records the passes Bi-Drop reads in each optimizer step (`step_reads`), for `FollowReference`.
    `nan_step`: in the step that starts at this global step, every pass after the first has a NaN loss."""

    nan_step: int | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.bidrop is None:  # built here rather than in the window's last micro-batch: to record its reads
            self.bidrop = self._bidrop_create(model)
        with record_reads(self.bidrop) as reads:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if reads:
            self.step_reads = reads
        return loss

    def compute_loss(self, model, inputs, **kwargs):
        loss = super().compute_loss(model, inputs, **kwargs)
        if self.state.global_step == self.nan_step:
            self.nan_calls = getattr(self, "nan_calls", 0) + 1
            if self.nan_calls > self.args.gradient_accumulation_steps:  # pass 2 on
                loss = loss * float("nan")
        return loss


class FollowReference(TrainerCallback):
    """After every optimizer step of `trainer`, the reference takes the same step (its own passes on the
    window's chunks, the oracle's update, its own optimizer at the LR the trainer's step used) or skips it;
    `rows` get the errors. `stop_at`: end training after that global step (its checkpoint is saved)."""

    def __init__(self, reference: Reference) -> None:
        self.reference, self.rows, self.trainer, self.stop_at = reference, [], None, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.lr = self.trainer.lr_scheduler.get_last_lr()[0] if self.trainer.lr_scheduler is not None else None

    def on_step_end(self, args, state, control, **kwargs):
        trainer, reference = self.trainer, self.reference
        if self.lr is not None:
            for group in reference.optimizer.param_groups:
                group["lr"] = self.lr
        if trainer.bidrop_last_result.skipped:
            reference.skip()
            row = {"weight_err": reference.weight_error(held_weights(trainer.bidrop))}
        else:
            chunks = trainer.seen[-args.gradient_accumulation_steps:]
            row = lockstep(reference, trainer.bidrop, trainer.step_reads, chunks)
            row.update(kept_fraction=trainer.bidrop_last_result.kept_fraction, reads=len(trainer.step_reads))
            del row["mask"]
        self.rows.append({"step": state.global_step, "skipped": trainer.bidrop_last_result.skipped, **row})
        if state.global_step == self.stop_at:
            control.should_training_stop = True


def assert_follows(rows: list[dict], k: int, weight_bound: float) -> None:
    """Every step: weights within `weight_bound` of the reference's (relative to each element's travel); a step
    taken: k reads equal to the reference's passes (fp32 rounding), the oracle's mask, its kept fraction."""
    for row in rows:
        assert row["weight_err"] <= weight_bound, row
        if not row["skipped"]:
            assert row["reads"] == k and row["read_err"] <= 1e-6 and row["mask_hard_differs"] == 0, row
            assert abs(row["kept_fraction"] - row["kept"] / row["N"]) < 2e-4, row


@pytest.mark.parametrize("kind, k", [("sgd", 2), ("adamw", 3)])
def test_every_step_follows_the_reference_across_a_skip_and_a_resume(kind: str, k: int, tmp_path: Path) -> None:
    """6 steps of 2 micro-batches in lockstep with the reference: step 2's passes after the first are NaN (skipped;
    the reference skips it too), the run stops after saving checkpoint-3, a new Trainer on a model of other
    weights, with a fresh optimizer, resumes from it, and steps 4-6 still follow the reference."""
    config = BiDropConfig(k=k, p=0.3, seed=13)

    def make(params):
        return torch.optim.SGD(params, lr=0.5) if kind == "sgd" else torch.optim.AdamW(params, lr=1e-2)

    follow = FollowReference(Reference(tiny_bert(0), make, config))
    args = training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    for seed, resume in ((0, None), (1, str(tmp_path / "checkpoint-3"))):
        model = tiny_bert(seed)
        trainer = LockstepTrainer(model=model, args=args, train_dataset=Rows(), callbacks=[follow],
                                  optimizers=(make(model.parameters()), None), bidrop_config=config)
        trainer.model_accepts_loss_kwargs = False  # see the module docstring
        trainer.nan_step = 1
        follow.trainer, follow.stop_at = trainer, 3 if resume is None else None
        trainer.train(resume_from_checkpoint=resume)
    assert [(row["step"], row["skipped"]) for row in follow.rows] == [(s, s == 2) for s in range(1, 7)]
    assert_follows(follow.rows, k, weight_bound=1e-4)
    assert trainer.bidrop.step_index == 6 and trainer.bidrop.skipped_steps == 1


def test_import_bidrop_ds_does_not_import_the_trainer() -> None:
    code = "import sys, bidrop_ds; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    import bidrop_ds
    import bidrop_ds.integrations

    assert bidrop_ds.BiDropTrainer is bidrop_ds.integrations.BiDropTrainer is BiDropTrainer
    assert bidrop_ds.BiDropTrainerMixin is BiDropTrainerMixin


# ----- 2 DeepSpeed ranks (torchrun): this file is the rank script -----------------------------------

def launch(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__)), *args]
    return run_in_session(command, env, timeout, "the 2-rank run")


TWO_RANK_STEPS = 4


@pytest.mark.parametrize("mode", ["zero2", "zero3", "ddp", "fsdp2"])
def test_two_ranks(mode: str, tmp_path: Path) -> None:
    """4 steps of 2 micro-batches on each of 2 ranks, every one in lockstep with the reference (AdamW at the
    Trainer's linearly decaying LR); the first step also against a hand-run BiDrop fed the chunks each rank saw,
    on the same backend (DeepSpeed engine, DDP) or, for FSDP2, on DDP (the same math).
    FSDP2 is forced on CPU: accelerate does not attach its FSDP plugin there, so the rank script switches the
    state to FSDP after the Trainer built its accelerator (a GPU run is the real check, not run here)."""
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    done = launch("--mode", mode, "--out", str(out), "--workdir", str(tmp_path))
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "terminate called" not in done.stderr
    result = json.loads(out.read_text())
    steps = TWO_RANK_STEPS
    assert result["world"] == 2 and result["global_step"] == steps
    assert result["bidrop_steps"] == steps and result["skipped"] == 0
    assert all(math.isfinite(loss) for loss in result["losses"]) and len(result["losses"]) == steps
    assert result["kept"] == pytest.approx([0.3] * steps, abs=0.01)
    assert result["final_lr"] == pytest.approx(0.0, abs=1e-12)  # linear decay to 0: the scheduler stepped every step
    for rows in result["lockstep"]:  # each rank's
        assert [row["step"] for row in rows] == list(range(1, steps + 1))
        # AdamW amplifies fp32 rounding on tiny gradients; ZeRO-3's reduction order: measured <= 1.1e-4
        assert_follows(rows, k=2, weight_bound=1e-3)
    assert result["first_step_max_diff"] <= 1e-6  # 0.0 when written
    assert result["first_step_loss"] == approx_logged_loss(result["hand_loss"])
    if mode == "ddp":
        # each pass all-reduced once: the chunk before the last ran under no_sync, as in the hand-run
        assert result["trainer_allreduces"] == steps * result["hand_allreduces"] and result["hand_allreduces"] >= 2
    elif mode == "fsdp2":
        assert result["backend"] == "Fsdp2Backend"
    else:
        # one engine.step() per window
        assert (result["stage"], result["engine_global_steps"]) == (int(mode[-1]), steps)
    assert result["built_partitioned"] == (mode == "zero3")  # from_pretrained inside zero.Init, same first step


def rank_main(argv: list[str]) -> None:
    """One rank: a BiDropTrainer on DeepSpeed ZeRO-2/3 (fp32), DDP or FSDP2 for 4 steps of 2 micro-batches (each
    followed by the reference's), then a
    hand-run BiDrop on a fresh engine / DDP model fed the chunks this rank saw in step 1; rank 0 writes the
    numbers. Ends as the field notes say (destroy the engines, collect, barrier, destroy the group)."""
    import argparse

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["zero2", "zero3", "ddp", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    deepspeed_mode = opts.mode.startswith("zero")
    stage = int(opts.mode[-1]) if deepspeed_mode else None
    config = BiDropConfig(k=2, p=0.3, seed=3)
    extra = dict(use_cpu=True, ddp_backend="gloo")
    if opts.mode == "fsdp2":
        extra.update(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
        os.environ["FSDP_VERSION"] = "2"  # transformers 4.x ignores fsdp_config's version; accelerate reads this
    if deepspeed_mode:
        import deepspeed
        from accelerate import PartialState

        # On CPU the Trainer's own set-up would start DeepSpeed without a backend (accelerate then sees one
        # process); a DeepSpeed-flavoured PartialState on gloo, reused through `use_configured_state`, gives 2 ranks.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        extra = dict(use_cpu=False, accelerator_config={"use_configured_state": True},
                     deepspeed={"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "train_batch_size": "auto", "gradient_clipping": "auto",
                                "zero_optimization": {"stage": stage}})

    def gathered(model: torch.nn.Module) -> list[torch.Tensor]:
        if opts.mode == "fsdp2":
            return [p.full_tensor().detach().clone() for p in model.parameters()]
        if stage != 3:
            return params(model)
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return params(model)

    def count_allreduces(ddp: DistributedDataParallel, calls: list[int]) -> None:
        def hook(state, bucket):
            calls.append(1)
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, hook)

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                self.params = gathered(model)

    class Counting(LockstepTrainer):
        """Counts the DDP all-reduces (a comm hook, registered before the first backward)."""

        calls: list[int] | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if isinstance(model, DistributedDataParallel) and self.calls is None:
                self.calls = []
                count_allreduces(model, self.calls)
            return super().training_step(model, inputs, num_items_in_batch)

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if opts.mode == "fsdp2":  # see test_two_ranks
                from accelerate.state import AcceleratorState, PartialState
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

                PartialState().distributed_type = AcceleratorState().distributed_type = DistributedType.FSDP
                # transformers 5 passes the plugin's arguments; 4.x set them as FSDP_* variables the plugin reads
                plugin_args = getattr(self.args, "fsdp_plugin_args", None) or {}
                AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
                self.is_fsdp_enabled = True

    first = FirstStep()
    model = tiny_bert(0)
    if stage == 3:  # saved here, loaded after TrainingArguments(deepspeed=...): then built inside zero.Init
        folder = Path(opts.workdir) / "tiny-bert"
        model.save_pretrained(folder)  # writes on the main process only
        dist.barrier()
    args = training_args(Path(opts.workdir) / "out", max_steps=TWO_RANK_STEPS, lr_scheduler_type="linear",
                         optim="adamw_torch",
                         **extra)
    if stage == 3:
        model = type(model).from_pretrained(folder)
    built_partitioned = all(p.numel() == 0 and hasattr(p, "ds_numel") for p in model.parameters())
    # after TrainingArguments, which starts the process group under DDP and FSDP2 (the reference reduces over it)
    follow = FollowReference(Reference(tiny_bert(0), lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0),
                                       config))  # the Trainer's adamw_torch: no decay
    trainer = Counting(model=model, args=args, train_dataset=Rows(n=48), callbacks=[first, follow],
                       bidrop_config=config)
    trainer.model_accepts_loss_kwargs = False  # see the module docstring
    follow.trainer = trainer
    trainer.train()
    lockstep_rows = [None] * dist.get_world_size()
    dist.all_gather_object(lockstep_rows, follow.rows)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    result = {"mode": opts.mode, "world": dist.get_world_size(), "global_step": trainer.state.global_step,
              "bidrop_steps": trainer.bidrop.step_index, "skipped": trainer.bidrop.skipped_steps,
              "losses": [log["loss"] for log in logs], "kept": [log["bidrop_kept_fraction"] for log in logs],
              "final_lr": trainer.lr_scheduler.get_last_lr()[0], "first_step_loss": logs[0]["loss"],
              "backend": type(trainer.bidrop.backend).__name__, "built_partitioned": built_partitioned,
              "lockstep": lockstep_rows}
    chunks, trainer_calls = trainer.seen[:2], trainer.calls
    if deepspeed_mode:
        engine = trainer.model_wrapped
        result.update(stage=engine.zero_optimization_stage(), engine_global_steps=engine.global_steps)
        engine.destroy()
        del engine
    del trainer
    gc.collect()

    hand_model = tiny_bert(0)
    optimizer = torch.optim.AdamW(hand_model.parameters(), lr=LR, weight_decay=0.0)  # the Trainer's: no decay
    if deepspeed_mode:
        hand_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16,
                       "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
                       "zero_allow_untested_optimizer": True}
        wrapped, *_ = deepspeed.initialize(model=hand_model, optimizer=optimizer, config=hand_config)
        hand = BiDrop(wrapped, config=config).step(chunks)
    else:
        wrapped, calls = DistributedDataParallel(hand_model), []
        count_allreduces(wrapped, calls)
        hand = BiDrop(wrapped, optimizer, config).step(chunks)
        if opts.mode == "ddp":
            result.update(hand_allreduces=len(calls), trainer_allreduces=len(trainer_calls))
    loss = torch.tensor([hand.loss], dtype=torch.float64)
    dist.all_reduce(loss)  # the logged loss is the mean over ranks
    result["hand_loss"] = loss.item() / dist.get_world_size()
    hand_params = gathered(hand_model) if deepspeed_mode else params(hand_model)
    result["first_step_max_diff"] = max((a - b).abs().max().item() for a, b in zip(first.params, hand_params))
    if deepspeed_mode:
        wrapped.destroy()
    del wrapped
    if dist.get_rank() == 0:
        Path(opts.out).write_text(json.dumps(result))
        print("RESULT", json.dumps(result))
    close_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1:])
