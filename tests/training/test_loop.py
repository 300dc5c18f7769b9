"""bidrop_ds.training.loop: the loop's accounting (skips, losses, kept fractions, per-layer logs),
its saves, a resume that goes on with the same batches and ends with the same totals, the per-epoch
callback, and the resume check. The Bi-Drop step is stood in for by a recorder of its batches."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.checkpoint import save_checkpoint
from bidrop_ds.training.loop import LoopState, check_resume, train
from tests.models import tiny_bert

SKIPPED = 5  # a batch holding this example is skipped, as a non-finite step is


class RecordingStep:
    """Records each step's example ids; the loss is their sum, the kept fraction their count / 10."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.step_index, self.count_layers, self.seen, self.counted = 0, False, [], []

    def step(self, batch: dict[str, torch.Tensor]) -> SimpleNamespace:
        ids = batch["x"].tolist()
        self.seen.append(ids)
        self.counted.append(self.count_layers)
        skipped = SKIPPED in ids
        self.step_index += 1
        return SimpleNamespace(loss=math.nan if skipped else float(sum(ids)), skipped=skipped,
                               kept_fraction=0.0 if skipped else len(ids) / 10, step=self.step_index)

    def kept_by_layer(self) -> dict[str, float]:
        return {"layer.0": self.step_index / 100}


def loader() -> DataLoader:
    """8 examples in seeded batches of 2: 4 steps per epoch."""
    rows = [{"x": torch.tensor(i)} for i in range(8)]
    return DataLoader(rows, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))


def whole_run() -> tuple[RecordingStep, dict, list[LoopState], list[tuple[int, float, int]]]:
    step, saved, epochs = RecordingStep(), [], []

    def end_of_epoch(epoch: int, loss: float, history: list) -> dict:
        epochs.append((epoch, loss, len(history)))
        return {"epoch": epoch + 1}

    stats = train(step, None, loader(), epochs=2, chunks=1, progress=False, log_every=3,
                  save=lambda state: saved.append(copy.deepcopy(state)), save_every=3, end_of_epoch=end_of_epoch)
    return step, stats, saved, epochs


def test_accounting_saves_and_callbacks() -> None:
    step, stats, saved, epochs = whole_run()
    assert sorted(sum(step.seen[:4], [])) == sorted(sum(step.seen[4:], [])) == list(range(8))
    assert step.seen[:4] != step.seen[4:]  # a new order each epoch
    assert [state.steps_done(4) for state in saved] == [3, 6, 8]  # every 3 steps, then after the last
    kept = [batch for batch in step.seen if SKIPPED not in batch]
    assert stats["skipped_steps"] == 2 and stats["mean_kept_fraction"] == pytest.approx(0.2)
    last_epoch = [sum(batch) for batch in step.seen[4:] if SKIPPED not in batch]
    assert stats["train_loss_last_epoch"] == pytest.approx(sum(last_epoch) / 3) and len(kept) == 6
    assert epochs == [(0, pytest.approx(sum(sum(b) for b in step.seen[:4] if SKIPPED not in b) / 3), 0),
                      (1, pytest.approx(stats["train_loss_last_epoch"]), 1)]
    assert stats["epoch_history"] == [{"epoch": 1}, {"epoch": 2}]
    # the per-layer log: counted in the steps whose number before the step is a multiple of 3, recorded
    # after the unskipped steps numbered a multiple of 3
    assert step.counted == [i % 3 == 0 for i in range(8)]
    logged = [entry[0] for entry in stats["layer_kept"]]
    assert logged == [n for n in (3, 6) if SKIPPED not in step.seen[n - 1]]


@pytest.mark.parametrize("cut", [0, 1])  # the step-3 save (mid epoch 1), the step-6 one (mid epoch 2)
def test_resume_goes_on_with_the_same_batches_and_totals(cut: int) -> None:
    whole, stats, saved, _ = whole_run()
    state = saved[cut]
    resumed = RecordingStep()
    resumed.step_index = state.steps_done(4)  # as bidrop_ds.checkpoint restores it
    again = train(resumed, None, loader(), epochs=2, chunks=1, progress=False, log_every=3,
                  resume_from=copy.deepcopy(state), end_of_epoch=lambda epoch, loss, history: {"epoch": epoch + 1})
    done = state.steps_done(4)
    assert resumed.seen == whole.seen[done:]
    assert again == stats


def test_resume_check_names_each_difference(tmp_path) -> None:
    model = tiny_bert()
    settings = {"lr": 1e-4, "epochs": 2}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bidrop = BiDrop(model, optimizer, BiDropConfig(k=1, strategy="vanilla"))
    save_checkpoint(model, bidrop, str(tmp_path), "step4", optimizer=optimizer,
                    client_state={"loop": asdict(LoopState())}, description=settings)
    check_resume(str(tmp_path), settings, "recipe.py")  # the same settings: no complaint
    with pytest.raises(SystemExit, match=r"^recipe.py: error: --resume: .*step4 was saved with other settings: "
                                         r"lr 0.0001, now 0.001; epochs 2, now 3\. Resume with"):
        check_resume(str(tmp_path), {"lr": 1e-3, "epochs": 3}, "recipe.py")
    with pytest.raises(SystemExit, match=r"step4 was not saved by recipe.py --save_dir"):
        check_resume(str(tmp_path), {"lr": 1e-4}, "recipe.py")
