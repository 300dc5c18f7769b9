"""Shared by the launch tests: the finetune recipe (`bidrop_ds.recipes.finetune`, what
launch/finetune.py runs) and the other launch scripts loaded as modules, a tiny config-built BERT with
the MiniLM tokenizer, small VADER files (no network), and the arguments of a small run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaForSequenceClassification

from tests.data.test_vader import write_ground_truth
from tests.models import padless_tokenizer, tiny_llama_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "finetune.py"


def load_script(name: str) -> ModuleType:
    """launch/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def small_run(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--train_size", "64", "--eval_size", "32", "--max_length", "32",
            "--epochs", "1", "--batch_size", "16", "--k", "2", "--p", "0.3", *extra]


@pytest.fixture(scope="session")
def finetune() -> ModuleType:
    """The recipe launch/finetune.py runs."""
    from bidrop_ds.recipes import finetune as recipe

    return recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, finetune: ModuleType) -> Path:
    """The MiniLM tokenizer (offline package) with a 2-layer, hidden-32 BERT, saved as one folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(finetune.default_model_path())
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama classifier as a decoder LLM checkpoint comes: no pad token in its tokenizer (a
    word-level one over the words of `vader_cache`) or config, attention_dropout 0 (the default)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    words = "a warm , funny and moving film dull clumsy tedious mess number".split() + [str(i) for i in range(400)]
    tokenizer = padless_tokenizer(words)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_llama_config(vocab_size=len(tokenizer), attention_dropout=0.0,
                                                     max_position_embeddings=64)).save_pretrained(folder)
    return folder


@pytest.fixture
def vader_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """400 movie rows in the published format (-> 320 train / 40 test), found via BIDROP_DATA_DIR
    (set in os.environ, so subprocesses find them too)."""
    words = {True: "a warm , funny and moving film", False: "a dull , clumsy and tedious mess"}
    rows = [(str(i + 1), (1.5 if i % 2 else -1.5) + (i % 7) / 10, f"{words[i % 2 == 1]} number {i}")
            for i in range(400)]
    write_ground_truth(tmp_path / "vader", {"movie": rows})
    monkeypatch.setenv("BIDROP_DATA_DIR", str(tmp_path / "vader"))
    return tmp_path / "vader"
