"""launch/finetune.py end to end on a tiny config-built BERT and small data files (no network)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from tests.data.test_glue import write_task
from tests.data.test_vader import write_ground_truth

ROOT = Path(__file__).resolve().parents[2]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "launch" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


finetune = load_script()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MiniLM tokenizer (offline package) with a 2-layer, hidden-32 BERT, saved as one folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(finetune.default_model_path())
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture
def vader_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """400 movie rows in the published format (-> 320 train / 40 test), found via BIDROP_DATA_DIR."""
    words = {True: "a warm , funny and moving film", False: "a dull , clumsy and tedious mess"}
    rows = [(str(i + 1), (1.5 if i % 2 else -1.5) + (i % 7) / 10, f"{words[i % 2 == 1]} number {i}")
            for i in range(400)]
    write_ground_truth(tmp_path / "vader", {"movie": rows})
    monkeypatch.setenv("BIDROP_DATA_DIR", str(tmp_path / "vader"))
    return tmp_path / "vader"


def small_run(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--train_size", "64", "--eval_size", "32", "--max_length", "32",
            "--epochs", "1", "--batch_size", "16", "--k", "2", "--p", "0.3", *extra]


def test_vader_demo_runs_bidrop_and_writes_json(tiny_model: Path, vader_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    summary = finetune.main(small_run(tiny_model, "--chunks", "2", "--output_json", str(out)))
    assert json.loads(out.read_text()) == summary
    assert (summary["task"], summary["train_size"], summary["eval_size"]) == ("vader-movie", 64, 32)
    assert summary["bidrop"]["k"] == 2 and summary["bidrop"]["p"] == 0.3
    assert summary["mean_kept_fraction"] == pytest.approx(0.3, abs=0.01)
    assert summary["skipped_steps"] == 0
    assert math.isfinite(summary["train_loss_last_epoch"]) and math.isfinite(summary["eval_loss"])
    assert summary["accuracy"] in {i / 32 for i in range(33)}


def test_same_seeds_give_the_same_run(tiny_model: Path, vader_cache: Path) -> None:
    first = finetune.main(small_run(tiny_model, "--seed", "5", "--train_seed", "1"))
    second = finetune.main(small_run(tiny_model, "--seed", "5", "--train_seed", "1"))
    other = finetune.main(small_run(tiny_model, "--seed", "5", "--train_seed", "2"))
    assert first["eval_loss"] == second["eval_loss"]
    assert first["train_loss_last_epoch"] == second["train_loss_last_epoch"]
    assert other["eval_loss"] != first["eval_loss"]


def test_vanilla_setting_keeps_everything(tiny_model: Path, vader_cache: Path) -> None:
    summary = finetune.main(small_run(tiny_model, "--k", "1"))
    assert summary["mean_kept_fraction"] == 1.0


@pytest.mark.parametrize("task, metrics", [("rte", {"accuracy"}), ("stsb", {"pearson", "spearman"})])
def test_glue_pair_tasks_from_tsv(tiny_model: Path, tmp_path: Path, task: str, metrics: set[str]) -> None:
    write_task(tmp_path / "glue", task)
    summary = finetune.main(["--model", str(tiny_model), "--task", f"glue-{task}", "--glue_dir", str(tmp_path / "glue"),
                             "--batch_size", "2", "--max_length", "32"])
    assert (summary["train_size"], summary["eval_size"]) == (2, 2)
    assert metrics <= set(summary) and all(math.isfinite(summary[m]) for m in metrics)


def test_bad_arguments_are_reported(tiny_model: Path, vader_cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown --task 'vader-imdb'"):
        finetune.main(small_run(tiny_model, "--task", "vader-imdb"))
    with pytest.raises(SystemExit):
        finetune.main(small_run(tiny_model, "--chunks", "17"))
    with pytest.raises(ValueError, match=r"BiDropConfig\.p = 1\.5"):
        finetune.main(small_run(tiny_model, "--p", "1.5"))
