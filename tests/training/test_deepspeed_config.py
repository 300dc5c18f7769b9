"""bidrop_ds.training.deepspeed_config: the batch fields filled for a global batch (and the
arithmetic errors naming the fix), the "bidrop" section and its precedence, refused sections."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import pytest

from bidrop_ds import BiDropConfig
from bidrop_ds.config import add_config_arguments
from bidrop_ds.training.deepspeed_config import (deepspeed_batch_config, load_deepspeed_config, offloads_optimizer,
                                                 resolve_bidrop_config)


def bidrop_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The Bi-Drop flags of a recipe (--k, --p, --bidrop_config, ...), parsed."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


AUTO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "zero_optimization": {"stage": 2}}


def test_batch_fields_are_filled() -> None:
    filled = deepspeed_batch_config(AUTO, batch_size=32, chunks=2, world=4)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"]) == (4, 2, 32)
    assert filled["zero_optimization"] == {"stage": 2} and AUTO["train_batch_size"] == "auto"
    agreeing = {**AUTO, "gradient_accumulation_steps": 2, "train_batch_size": 32}
    assert deepspeed_batch_config(agreeing, 32, 2, 4) == filled


def test_batch_arithmetic_errors_name_numbers_and_fix() -> None:
    with pytest.raises(ValueError, match=r"--batch_size 30 .* 4 rank\(s\) x 2 chunk\(s\) = 8 .* "
                                         r"Use --batch_size 24 or --batch_size 32, or change --chunks"):
        deepspeed_batch_config(AUTO, 30, 2, 4)
    with pytest.raises(ValueError, match=r"cfg\.json: gradient_accumulation_steps=1 \(this run needs 2\), "
                                         r"train_batch_size=64 \(this run needs 32\) contradicts --batch_size 32"):
        deepspeed_batch_config({**AUTO, "gradient_accumulation_steps": 1, "train_batch_size": 64},
                                        32, 2, 4, source="cfg.json")


def test_deepspeed_json_bidrop_section_and_precedence(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**AUTO, "bidrop": {"k": 4, "p": 0.2, "score": "perturbation"}}))
    config, section = load_deepspeed_config(str(ds), 8, 1, 2)
    assert "bidrop" not in config and config["zero_allow_untested_optimizer"] is True
    assert section == {"k": 4, "p": 0.2, "score": "perturbation"}
    (tmp_path / "bidrop.json").write_text(json.dumps({"p": 0.4, "seed": 3}))
    args = bidrop_flags(["--bidrop_config", str(tmp_path / "bidrop.json"), "--k", "3"])
    resolved = resolve_bidrop_config(args, section, str(ds))
    # section < --bidrop_config file < flags; keys nobody sets keep the dataclass default
    assert (resolved.k, resolved.p, resolved.score, resolved.seed, resolved.eps) == (3, 0.4, "perturbation", 3, 1e-8)
    assert resolve_bidrop_config(bidrop_flags([]), None) == BiDropConfig()


def test_deepspeed_json_errors(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**AUTO, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match=r"remove the 'optimizer' section"):
        load_deepspeed_config(str(ds), 8, 1, 2)
    ds.write_text(json.dumps({**AUTO, "bidrop": {"q": 1}}))
    _, section = load_deepspeed_config(str(ds), 8, 1, 2)
    with pytest.raises(ValueError, match=r"ds\.json: \"bidrop\": BiDropConfig: unknown key\(s\) 'q'"):
        resolve_bidrop_config(argparse.Namespace(bidrop_config=None), section, str(ds))


def test_offload_is_read_from_the_zero_section() -> None:
    assert offloads_optimizer({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    assert not offloads_optimizer(None)
