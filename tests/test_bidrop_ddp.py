"""BiDrop under DDP on 2 real gloo processes: each pass's gradient is the all-reduced one, the
masks and updates equal the oracle replay on every rank, and the ranks stay identical."""

from __future__ import annotations


import torch
from torch.nn.parallel import DistributedDataParallel

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.bidrop import derive_seed
from tests.distributed import run_distributed
from tests.models import random_batch, split_chunks, tiny_bert
from tests.replay import replay_step

SCENARIOS = [  # (optimizer, chunks, seed)
    ("sgd", 1, None),
    ("adamw", 2, 7),
]


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5) if kind == "sgd" else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _ddp_scenarios(rank: int, world_size: int) -> list[dict]:
    out = []
    for kind, chunks, seed in SCENARIOS:
        config = BiDropConfig(k=2, p=0.3, seed=seed)
        model = DistributedDataParallel(tiny_bert(seed=0))
        oracle_model = DistributedDataParallel(tiny_bert(seed=0))
        bidrop = BiDrop(model, _optimizer(kind, model.parameters()), config)
        oracle_opt = _optimizer(kind, oracle_model.parameters())
        max_diff, masked_moved, kept = 0.0, 0, []
        for step in range(3):
            batch = split_chunks(random_batch(1000 * rank + step), chunks)  # different data per rank
            before = [q.detach().clone() for q in model.parameters()]
            torch.manual_seed(10 * step + rank)
            result = bidrop.step(batch)
            torch.manual_seed(10 * step + rank)
            oracle = replay_step(
                oracle_model, oracle_opt, batch, k=config.k, p=config.p, include=config.include,
                before_pass=(lambda j: None) if seed is None else
                (lambda j, s=step: torch.manual_seed(derive_seed(seed, s, j, rank))))
            kept.append((result.kept_fraction, int(oracle.mask.sum()), oracle.mask.numel()))
            for (name, a), b in zip(model.module.named_parameters(), oracle_model.module.parameters()):
                if "attention.self.key.bias" not in name:
                    max_diff = max(max_diff, (a - b).abs().max().item())
            if kind == "sgd":
                flat_before = torch.cat([q.reshape(-1) for (n, _), q in zip(model.module.named_parameters(), before)
                                         if config.is_eligible(n)])
                flat_after = torch.cat([q.detach().reshape(-1) for n, q in model.module.named_parameters()
                                        if config.is_eligible(n)])
                masked_moved += int((flat_before[~oracle.mask] != flat_after[~oracle.mask]).sum())
        out.append({"max_abs_diff": max_diff, "masked_moved": masked_moved, "kept": kept,
                    "params": torch.cat([q.detach().reshape(-1) for q in model.parameters()])})
    return out


def test_ddp_matches_oracle_on_both_ranks():
    ranks = run_distributed(_ddp_scenarios, world_size=2)
    for scenario_index, (kind, chunks, seed) in enumerate(SCENARIOS):
        per_rank = [r[scenario_index] for r in ranks]
        for r in per_rank:
            # fp32 vs the float64 oracle: ~1e-7 at lr 1e-2 (AdamW normalises near-zero gradients)
            assert r["max_abs_diff"] < 1e-6, (kind, chunks, seed, r["max_abs_diff"])
            assert r["masked_moved"] == 0
            for fraction, oracle_kept, total in r["kept"]:
                assert abs(fraction - oracle_kept / total) < 2e-4
        assert torch.equal(per_rank[0]["params"], per_rank[1]["params"]), "ranks diverged"


def _mismatched_ranks(rank: int, world_size: int) -> list[str]:
    """Rank 1 differs: first in p, then in the parameters' dtype; each must fail on both ranks."""
    out = []
    for p, dtype in ((0.3 if rank == 0 else 0.5, torch.float32), (0.3, torch.float32 if rank == 0 else torch.float64)):
        model = tiny_bert(seed=0).to(dtype)
        try:
            BiDrop(model, torch.optim.SGD(model.parameters(), lr=0.1), BiDropConfig(p=p))
            out.append("accepted")
        except ValueError as err:
            out.append(str(err))
    return out


def test_ranks_with_different_settings_fail_at_construction():
    for messages in run_distributed(_mismatched_ranks, world_size=2, timeout_s=120):
        assert len(messages) == 2
        for message in messages:
            assert "the 2 ranks disagree on the Bi-Drop config" in message, message
