"""The rules see only their context: nothing in bidrop_ds/strategies imports the driver
(bidrop_ds/bidrop.py), not even for type hints, nor torch.distributed, DeepSpeed or accelerate."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bidrop_ds.strategies

FORBIDDEN = ("bidrop_ds.bidrop", "torch.distributed", "deepspeed", "bidrop_ds.comm", "accelerate")
PACKAGE = "bidrop_ds.strategies"


def imported_names(path: Path) -> list[str]:
    """Every module (and `module.name`) a file imports, anywhere in it, relative imports resolved."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative to a module of PACKAGE
                base = PACKAGE.split(".")[:len(PACKAGE.split(".")) + 1 - node.level]
                module = ".".join(base + ([module] if module else []))
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def offenders(folder: Path) -> list[str]:
    return [f"{path.name}: {name}" for path in sorted(folder.glob("*.py")) for name in imported_names(path)
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)]


def test_strategies_never_import_the_driver():
    assert not offenders(Path(bidrop_ds.strategies.__file__).parent)


@pytest.mark.parametrize("line", ["import bidrop_ds.bidrop", "from bidrop_ds import bidrop",
                                  "from bidrop_ds.bidrop import BiDrop", "from .. import bidrop",
                                  "from ..bidrop import BiDrop",
                                  "if TYPE_CHECKING:\n    from bidrop_ds.bidrop import BiDrop"])
def test_the_check_sees_every_form_of_import(tmp_path, line):
    (tmp_path / "rule.py").write_text(f"from typing import TYPE_CHECKING\nfrom . import base\n{line}\n")
    assert offenders(tmp_path), line
