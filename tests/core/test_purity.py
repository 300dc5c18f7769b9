"""The core stays pure math: no torch.distributed, DeepSpeed or backend import anywhere in it."""

from __future__ import annotations

import ast
from pathlib import Path

import bidrop_ds.core

FORBIDDEN = ("torch.distributed", "deepspeed", "bidrop_ds.backends", "bidrop_ds.comm", "accelerate")


def test_core_imports_no_distributed_code():
    core = Path(bidrop_ds.core.__file__).parent
    offenders = []
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(FORBIDDEN)]
    assert not offenders, offenders
    assert "dist." not in "".join(p.read_text() for p in core.glob("*.py")).replace("_dist.", "")
