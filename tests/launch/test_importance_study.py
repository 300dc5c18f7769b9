"""launch/importance_study.py: per-layer Spearman on known inputs, and a tiny study end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.launch.conftest import ROOT


@pytest.fixture(scope="module")
def study() -> ModuleType:
    sys.path.insert(0, str(ROOT / "launch"))
    spec = importlib.util.spec_from_file_location("importance_study", ROOT / "launch" / "importance_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_per_layer_spearman_on_known_orders(study: ModuleType) -> None:
    eligible = [("encoder.layer.0.w", 5), ("encoder.layer.0.b", 3), ("encoder.layer.1.w", 8)]
    score = torch.arange(16, dtype=torch.float32)
    fisher = score ** 2                                  # same order everywhere: rho = 1
    moved = torch.cat([-score[:8], score[8:].flip(0)])   # reversed everywhere: rho = -1
    rows = study.per_layer(eligible, score, fisher, moved)
    assert [(r["layer"], r["elements"]) for r in rows] == [("layer.0", 8), ("layer.1", 8)]
    for row in rows:
        assert row["spearman_fisher"] == pytest.approx(1.0) and row["spearman_displacement"] == pytest.approx(-1.0)


def test_tiny_study_writes_its_table_and_plot(study: ModuleType, tiny_model: Path, vader_cache: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "study"
    study.main(["--out", str(out), "--", "--model", str(tiny_model), "--train_size", "32", "--batch_size", "16",
                "--max_length", "16", "--seed", "1"])
    rows = json.loads((out / "importance.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["layer.0", "layer.1"]
    assert all(-1.0 <= r["spearman_fisher"] <= 1.0 and -1.0 <= r["spearman_displacement"] <= 1.0 for r in rows)
    assert (out / "importance.png").stat().st_size > 0 and "| layer.1 |" in (out / "importance.md").read_text()
    with pytest.raises(SystemExit, match="needs strategy bidrop"):
        study.main(["--out", str(out), "--", "--model", str(tiny_model), "--strategy", "vanilla"])
