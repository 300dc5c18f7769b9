"""Oracle replay of a Bi-Drop step: the same passes run by hand, every pass's gradient stored,
the spec applied in float64 by tests/oracle.py, the result fed to the same kind of optimizer."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tests.oracle import OracleStep, eligible_names, oracle_step


def replay_step(model: nn.Module, optimizer: torch.optim.Optimizer, chunks: list[dict], *, k: int, p: float,
                score: str = "product", rescale: bool = False, include: tuple[str, ...], exclude: tuple[str, ...] = (),
                before_pass: Callable[[int], None] = lambda j: None) -> OracleStep:
    """One step by the spec; `model` may be DDP-wrapped (its .grad after backward is then the rank average)."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    named = [(n, q) for n, q in module.named_parameters() if q.requires_grad]
    chosen = set(eligible_names([n for n, _ in named], include, exclude))
    passes = []
    for j in range(k):
        optimizer.zero_grad(set_to_none=True)
        before_pass(j)
        for chunk in chunks:
            loss = model(**chunk).loss
            (loss / len(chunks) if len(chunks) > 1 else loss).backward()
        passes.append({n: q.grad.detach().clone().double() for n, q in named})
    eligible = [(n, q) for n, q in named if n in chosen]
    flat = [torch.cat([g[n].reshape(-1) for n, _ in eligible]) for g in passes]
    abs_param = torch.cat([q.detach().reshape(-1) for _, q in eligible]).abs()
    oracle = oracle_step(flat, abs_param, p, score=score, rescale=rescale)
    offset = 0
    for n, q in named:
        if n in chosen:
            q.grad = oracle.update[offset:offset + q.numel()].view_as(q).to(q.dtype).clone()
            offset += q.numel()
        else:
            q.grad = (sum(g[n] for g in passes) / k).to(q.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return oracle
