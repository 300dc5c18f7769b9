"""bidrop_ds.training.cli: a recipe's argument mistake is one line naming the program, exit 2."""

from __future__ import annotations

import pytest

from bidrop_ds.training.cli import OneLineParser


def test_a_mistake_is_one_line_without_the_usage_block(capsys: pytest.CaptureFixture) -> None:
    parser = OneLineParser(prog="recipe.py")
    parser.add_argument("--steps", type=int, required=True)
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--steps", "many"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "recipe.py: error: argument --steps: invalid int value: 'many' (see --help)\n"
    with pytest.raises(SystemExit):
        parser.error("--steps must be >= 1")
    assert capsys.readouterr().err == "recipe.py: error: --steps must be >= 1 (see --help)\n"
