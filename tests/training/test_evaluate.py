"""bidrop_ds.training.evaluate: the loss and metrics of held-out sets (checked against a hand count),
the best-dev row, and choosing the epoch by dev with the held-out sets evaluated during training or
only at the end on the restored best-dev parameters: the same numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bidrop_ds.data.glue import TaskSpec
from bidrop_ds.training.evaluate import DevSelection, best_dev_row, evaluate, held_out_metrics

SPEC = TaskSpec(("text",), 2, False, ("accuracy",), ("negative", "positive"))


class SignModel(torch.nn.Module):
    """Logits (0, w * x): predicts class 1 where w * x > 0; the loss is the cross-entropy."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        logits = torch.stack([torch.zeros_like(x), self.w * x], dim=-1)
        return type("Out", (), {"logits": logits, "loss": F.cross_entropy(logits, labels)})


def rows(xs: list[float], labels: list[int]) -> DataLoader:
    data = [{"x": torch.tensor(x), "labels": torch.tensor(y)} for x, y in zip(xs, labels)]
    return DataLoader(data, batch_size=3)


def expected(w: float, xs: list[float], labels: list[int]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) by hand: log(1 + e^z) - y z with z = w x."""
    losses = [math.log1p(math.exp(w * x)) - y * w * x for x, y in zip(xs, labels)]
    hits = [(w * x > 0) == bool(y) for x, y in zip(xs, labels)]
    return sum(losses) / len(xs), sum(hits) / len(xs)


TEST = ([1.0, 2.0, -1.0, -0.5, 3.0], [1, 1, 0, 1, 0])
OTHER = ([0.5, -2.0], [1, 0])


def test_evaluate_counts_every_example_and_prefixes_the_other_sets() -> None:
    model = SignModel(0.7)
    results = evaluate(model, {"test": rows(*TEST), "other": rows(*OTHER)}, SPEC, progress=False)
    loss, accuracy = expected(0.7, *TEST)
    other_loss, other_accuracy = expected(0.7, *OTHER)
    assert results == pytest.approx({"eval_loss": loss, "accuracy": accuracy, "eval_examples": 5,
                                     "other_eval_loss": other_loss, "other_accuracy": other_accuracy,
                                     "other_eval_examples": 2})
    assert not model.training


def test_best_dev_row_prefers_the_earliest_and_never_nan() -> None:
    history = [{"epoch": 1, "dev_mcc": 0.2}, {"epoch": 2, "dev_mcc": 0.5}, {"epoch": 3, "dev_mcc": 0.5},
               {"epoch": 4, "dev_mcc": math.nan}]
    assert best_dev_row(history, "mcc")["epoch"] == 2
    assert best_dev_row([{"epoch": 1, "dev_mcc": math.nan}, {"epoch": 2, "dev_mcc": math.nan}], "mcc")["epoch"] == 2
    row = {"epoch": 2, "train_loss": 0.3, "dev_accuracy": 0.9, "dev_eval_loss": 0.1, "accuracy": 0.8,
           "eval_loss": 0.4, "other_accuracy": 0.7}
    assert held_out_metrics(row) == {"accuracy": 0.8, "eval_loss": 0.4, "other_accuracy": 0.7}


@pytest.mark.parametrize("held_out_at", ["new_best", "end"])
def test_the_best_dev_epoch_is_reported_with_its_own_weights(held_out_at: str, capsys) -> None:
    """Epochs leave w at 1 (dev right), -1 (dev wrong), 0.5 (dev right again: a tie, so epoch 1 stays
    best); the held-out metrics at the best epoch are w = 1's, the last epoch's w = 0.5's."""
    dev = ([1.0, -1.0, 2.0], [1, 0, 1])
    model = SignModel(0.0)
    selection = DevSelection(model, rows(*dev), {"test": rows(*TEST)}, SPEC, None, epochs=3,
                             held_out_at=held_out_at)
    history: list[dict] = []
    for epoch, w in enumerate([1.0, -1.0, 0.5]):
        model.w.data.fill_(w)
        history.append(selection.end_of_epoch(epoch, 0.1 * epoch, history))
    evaluated = ["accuracy" in row for row in history]
    assert evaluated == ([True, False, True] if held_out_at == "new_best" else [False, False, False])
    last, best = selection.finish(history)
    assert best["best_dev_epoch"] == 1
    for metrics, w in ((best["at_best_dev_epoch"], 1.0), (last, 0.5)):
        loss, accuracy = expected(w, *TEST)
        assert metrics == pytest.approx({"eval_loss": loss, "accuracy": accuracy, "eval_examples": 5})
    assert history[0]["dev_accuracy"] == 1.0 and history[1]["dev_accuracy"] == 0.0
    assert "epoch 2/3: train_loss=0.1000 dev accuracy=0.0000" in capsys.readouterr().out
    with pytest.raises(ValueError, match="held_out_at must be one of"):
        DevSelection(model, rows(*dev), {}, SPEC, None, 1, held_out_at="sometimes")
