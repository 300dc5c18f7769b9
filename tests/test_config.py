"""BiDropConfig: defaults, validation, JSON round trip, eligibility and the argparse bridge."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from bidrop_ds.config import DEFAULT_INCLUDE, BiDropConfig, add_config_arguments


def test_defaults():
    """The documented defaults (our choice): k=2, p=0.3, product, no rescale, eps=1e-8, blocks only."""
    cfg = BiDropConfig()
    assert (cfg.k, cfg.p, cfg.score, cfg.rescale, cfg.eps) == (2, 0.3, "product", False, 1e-8)
    assert cfg.include == DEFAULT_INCLUDE and cfg.exclude == () and cfg.seed is None and cfg.threshold == "global"


@pytest.mark.parametrize("field,value,shown", [
    ("k", 0, "0"), ("k", -2, "-2"), ("k", 1.5, "1.5"), ("k", True, "True"), ("k", "2", "'2'"),
    ("p", 0, "0"), ("p", 0.0, "0.0"), ("p", -0.1, "-0.1"), ("p", 1.0001, "1.0001"), ("p", math.nan, "nan"),
    ("p", math.inf, "inf"), ("p", True, "True"), ("p", "0.3", "'0.3'"),
    ("score", "x", "'x'"), ("score", None, "None"),
    ("threshold", "local", "'local'"), ("threshold", None, "None"),
    ("rescale", "yes", "'yes'"), ("rescale", 1, "1"),
    ("eps", 0, "0"), ("eps", -1e-8, "-1e-08"), ("eps", math.inf, "inf"), ("eps", math.nan, "nan"),
    ("include", "str", "'str'"), ("include", ["("], "'('"), ("include", None, "None"), ("include", [3], "3"),
    ("exclude", "attention", "'attention'"), ("exclude", ["[a-"], "'[a-'"),
    ("seed", 1.5, "1.5"), ("seed", True, "True"), ("seed", "1", "'1'"),
])
def test_invalid_values_raise_naming_field_and_value(field, value, shown):
    """Each bad value raises ValueError whose message names the field and the offending value."""
    with pytest.raises(ValueError) as err:
        BiDropConfig(**{field: value})
    message = str(err.value)
    assert f"BiDropConfig.{field} =" in message and shown in message, message


@pytest.mark.parametrize("kwargs", [dict(k=1), dict(p=1), dict(p=1.0), dict(p=1e-9), dict(seed=0), dict(seed=-3),
                                    dict(include=[], exclude=[r"\.bias$"]), dict(eps=1e-30)])
def test_valid_edge_values_accepted(kwargs):
    """Boundary values that are legal (k = 1, p = 1, int p, seed 0, empty include) are accepted."""
    BiDropConfig(**kwargs)


def test_lists_become_tuples_and_config_is_hashable():
    """include / exclude given as lists are stored as tuples: frozen, hashable, equal."""
    cfg = BiDropConfig(include=["a", "b"], exclude=["c"])
    assert cfg.include == ("a", "b") and cfg.exclude == ("c",)
    assert hash(cfg) == hash(BiDropConfig(include=("a", "b"), exclude=("c",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3  # type: ignore[misc]


NON_DEFAULT = BiDropConfig(k=4, p=0.15, score="scaling", rescale=True, eps=1e-6, threshold="per_tensor",
                           include=[r"layers\.\d+\.mlp"], exclude=[r"\.bias$", "norm"], seed=7)


@pytest.mark.parametrize("cfg", [BiDropConfig(), NON_DEFAULT])
def test_json_round_trip(cfg, tmp_path):
    """to_dict/from_dict and to_json/from_json (through a file) give an equal config."""
    assert BiDropConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(cfg.to_json()) == cfg.to_dict()
    path = tmp_path / "bidrop.json"
    path.write_text(cfg.to_json(), encoding="utf-8")
    assert BiDropConfig.from_json(str(path)) == cfg


def test_unknown_keys_rejected_by_name(tmp_path):
    """Unknown keys (typos) raise ValueError naming each of them, from a dict or a JSON file."""
    with pytest.raises(ValueError, match=r"'foo'.*'kk'|'kk'.*'foo'"):
        BiDropConfig.from_dict({"k": 3, "kk": 3, "foo": 1})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"p": 0.2, "sccore": "product"}), encoding="utf-8")
    with pytest.raises(ValueError, match="'sccore'"):
        BiDropConfig.from_json(str(path))
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON object"):
        BiDropConfig.from_json(str(path))


@pytest.mark.parametrize("name,eligible", [
    ("bert.encoder.layer.3.attention.self.query.weight", True),
    ("bert.encoder.layer.11.output.LayerNorm.bias", True),
    ("roberta.encoder.layer.0.intermediate.dense.weight", True),
    ("bert.embeddings.word_embeddings.weight", False),
    ("bert.embeddings.LayerNorm.weight", False),
    ("bert.pooler.dense.weight", False),
    ("classifier.weight", False),
    ("classifier.out_proj.bias", False),
    ("model.layers.11.mlp.up_proj.weight", True),
    ("model.embed_tokens.weight", False),
    ("model.norm.weight", False),
    ("lm_head.weight", False),
    ("transformer.h.0.attn.c_attn.weight", True),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", True),  # peft LoRA
    ("base_model.model.model.layers.11.mlp.down_proj.lora_B.default.weight", True),
    ("base_model.model.score.modules_to_save.default.weight", False),
    ("base_model.model.lm_head.weight", False),
    ("transformer.wte.weight", False),
    ("transformer.ln_f.weight", False),
    ("encoder.block.2.layer.0.SelfAttention.q.weight", True),
    ("mesh.0.weight", False),  # "h." must start a name component
    ("layer.3.weight", True),
])
def test_default_eligibility(name, eligible):
    """Default: parameters of the repeated blocks are maskable; embeddings, pooler, head are not."""
    assert BiDropConfig().is_eligible(name) is eligible


def test_exclude_overrides_include():
    """exclude wins over include; a custom include can make the head eligible."""
    cfg = BiDropConfig(exclude=[r"\.attention\."])
    assert not cfg.is_eligible("bert.encoder.layer.3.attention.self.query.weight")
    assert cfg.is_eligible("bert.encoder.layer.3.intermediate.dense.weight")
    custom = BiDropConfig(include=[r"^classifier\."], exclude=[r"\.bias$"])
    assert custom.is_eligible("classifier.weight") and not custom.is_eligible("classifier.bias")
    assert not custom.is_eligible("bert.encoder.layer.3.attention.self.query.weight")


def _parse(argv: list[str]) -> BiDropConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1e-5)  # the host script's own flags coexist
    add_config_arguments(parser)
    return BiDropConfig.from_args(parser.parse_args(argv))


def test_from_args_flags():
    """No flag gives the defaults; every field is settable by its flag."""
    assert _parse([]) == BiDropConfig()
    argv = ["--k", "4", "--p", "0.15", "--score", "scaling", "--rescale", "--eps", "1e-6", "--threshold", "per_tensor",
            "--include", r"layers\.\d+\.mlp", "--exclude", r"\.bias$", "norm", "--seed", "7"]
    assert _parse(argv) == NON_DEFAULT
    assert _parse(["--no-rescale"]).rescale is False


def test_from_args_json_and_override(tmp_path):
    """--bidrop_config supplies the values; flags on the command line override them, including
    falsy ones (--no-rescale over rescale: true, --seed 0 over seed: 7)."""
    path = tmp_path / "cfg.json"
    path.write_text(NON_DEFAULT.to_json(), encoding="utf-8")
    assert _parse(["--bidrop_config", str(path)]) == NON_DEFAULT
    got = _parse(["--bidrop_config", str(path), "--p", "0.5", "--no-rescale", "--seed", "0", "--exclude"])
    assert got == BiDropConfig(**{**NON_DEFAULT.to_dict(), "p": 0.5, "rescale": False, "seed": 0, "exclude": []})


def test_from_args_validates():
    """A bad value given by flag is rejected by the same validation."""
    with pytest.raises(ValueError, match="BiDropConfig.p = 2.0"):
        _parse(["--p", "2"])


def test_strategies_and_their_pass_counts():
    """k defaults to 2 for bidrop and 1 for the one-pass strategies; a conflicting k is refused."""
    assert BiDropConfig().k == 2
    for name in ("vanilla", "childtuning-d", "childtuning-f", "dps"):
        assert BiDropConfig(strategy=name).k == 1
        with pytest.raises(ValueError, match=f"BiDropConfig.k = 2 .*strategy '{name}'"):
            BiDropConfig(strategy=name, k=2)
    assert not BiDropConfig(strategy="vanilla").masking and BiDropConfig(strategy="dps").masking
    assert not BiDropConfig(k=1).masking and not BiDropConfig(p=1).masking


@pytest.mark.parametrize("alias,score,other", [("bidrop-perturbation", "perturbation", "scaling"),
                                               ("bidrop-scaling", "scaling", "random"),
                                               ("bidrop-random", "random", "perturbation")])
def test_ablation_names_are_bidrop_with_that_score(alias, score, other):
    cfg = BiDropConfig(strategy=alias)
    assert (cfg.strategy, cfg.score, cfg.k) == ("bidrop", score, 2)
    assert BiDropConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=f"BiDropConfig.score = '{other}' .*{alias}"):
        BiDropConfig(strategy=alias, score=other)


@pytest.mark.parametrize("field,value", [("strategy", "childtuning"), ("strategy", None), ("dps_window", 0),
                                         ("dps_window", 2.0), ("max_consecutive_skips", -1),
                                         ("max_consecutive_skips", True), ("allow_no_dropout", "no")])
def test_invalid_strategy_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"BiDropConfig.{field} ="):
        BiDropConfig(**{field: value})


def test_per_tensor_threshold_is_a_bidrop_setting():
    """threshold="per_tensor" with bidrop (and its ablations); other rules keep their own selection."""
    assert BiDropConfig(strategy="bidrop-scaling", threshold="per_tensor").threshold == "per_tensor"
    with pytest.raises(ValueError, match="BiDropConfig.threshold = 'per_tensor' .*'dps'"):
        BiDropConfig(strategy="dps", k=1, threshold="per_tensor")


def test_strategy_flags():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--strategy", "bidrop-random", "--max_consecutive_skips", "3", "--allow_no_dropout"])
    cfg = BiDropConfig.from_args(args)
    assert (cfg.strategy, cfg.score, cfg.max_consecutive_skips, cfg.allow_no_dropout) == ("bidrop", "random", 3, True)
    assert BiDropConfig.from_args(parser.parse_args(["--strategy", "dps", "--dps_window", "4"])).dps_window == 4


def test_help_shows_each_field_default_once() -> None:
    """The flags default to None (so a JSON file can fill them); --help must still show the field's
    default, and ArgumentDefaultsHelpFormatter must not add that None after it."""
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "in (0, 1] (default: 0.3)" in text and "(default: product)" in text
    assert "(default: 10) --" in text  # dps_window, then the next flag
    assert text.count("(default: None)") == 2  # --bidrop_config and --seed, whose defaults are None
