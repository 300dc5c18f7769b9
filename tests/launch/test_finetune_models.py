"""launch/finetune.py --model with a decoder LLM checkpoint (a tiny Llama with no pad token and
attention_dropout 0, as Llama, Qwen and Mistral checkpoints come), in one process."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest

from tests.launch.conftest import small_run


def test_a_llama_without_dropout_is_refused_naming_the_setting(finetune: ModuleType, tiny_llama_model: Path,
                                                               vader_cache: Path) -> None:
    with pytest.raises(SystemExit, match=r"its only dropout setting is attention_dropout=0\.0, so the k=2 Bi-Drop "
                                         r"passes would be identical; raise it with --model_dropout 0\.1"):
        finetune.main(small_run(tiny_llama_model))


def test_a_llama_classifier_fine_tunes_with_model_dropout(finetune: ModuleType, tiny_llama_model: Path,
                                                          vader_cache: Path) -> None:
    summary = finetune.main(small_run(tiny_llama_model, "--model_dropout", "0.1", "--chunks", "2"))
    assert summary["model_dropout"] == 0.1 and summary["skipped_steps"] == 0
    assert summary["mean_kept_fraction"] == pytest.approx(0.3, abs=0.01)  # model.layers.N. are eligible
    assert math.isfinite(summary["train_loss_last_epoch"]) and math.isfinite(summary["eval_loss"])
    assert summary["built_elements_per_rank"] == [summary["model_elements"]]  # one process: built whole
