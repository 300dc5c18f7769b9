"""BiDrop under DDP on 2 real gloo processes, in lockstep with an independent reference replica
(tests/reference.py: its own passes with the same dropout draws, the float64 oracle's update, its own
optimizer): at every step each pass Bi-Drop read equals the reference's all-reduced pass, the mask
the oracle's and the weights the reference's, across a skipped step (a NaN pass on one rank) and a
`bidrop_ds.checkpoint` save and resume into a fresh model in the middle; the ranks stay identical."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.checkpoint import load_checkpoint, save_checkpoint
from tests.distributed import run_distributed
from tests.models import random_batch, split_chunks, tiny_bert
from tests.reference import Reference, held_weights, lockstep, record_reads

SCENARIOS = [  # (optimizer, k, chunks)
    ("sgd", 2, 1),
    ("adamw", 3, 2),
]
STEPS = 6              # 5 compared: 0, 2 | 3, 4, 5
SKIPPED = 1            # this step's second pass is NaN on rank 1 only: every rank skips
RESUME_AFTER = 3       # steps; then a checkpoint, and a fresh model (other weights) resumed from it
# Weights against the reference, relative to each element's travel (tests/reference.py): DDP averages the
# ranks' gradients in its own order, so a gradient agrees with the reference's to fp32 rounding of that sum;
# on a bias that starts at 0 and moves little this reached 2e-5 (SGD) over 4 steps. A lost, doubled or
# mis-masked update reads ~1.
WEIGHT_BOUND = 1e-4


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5) if kind == "sgd" else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _run(kind: str, config: BiDropConfig, seed: int) -> tuple[DistributedDataParallel, torch.optim.Optimizer, BiDrop]:
    model = DistributedDataParallel(tiny_bert(seed=seed))
    optimizer = _optimizer(kind, model.parameters())
    return model, optimizer, BiDrop(model, optimizer, config)


def _ddp_scenarios(rank: int, world_size: int, directory: str) -> list[dict]:
    out = []
    for index, (kind, k, chunks) in enumerate(SCENARIOS):
        config = BiDropConfig(k=k, p=0.3, seed=7)
        model, optimizer, bidrop = _run(kind, config, seed=0)
        reference = Reference(tiny_bert(seed=0), lambda params: _optimizer(kind, params), config)
        rows = []
        for step in range(STEPS):
            if step == RESUME_AFTER:
                save_checkpoint(model, bidrop, directory, f"scenario-{index}", optimizer=optimizer)
                model, optimizer, bidrop = _run(kind, config, seed=1)  # other weights: only the load restores them
                load_checkpoint(model, bidrop, directory, f"scenario-{index}", optimizer=optimizer)
            batch = split_chunks(random_batch(1000 * rank + step), chunks)  # different data per rank
            calls = []

            def poisoned(module, chunk):
                calls.append(1)
                loss = module(**chunk).loss
                return loss * float("nan") if rank == 1 and len(calls) == chunks + 1 else loss

            with record_reads(bidrop) as reads:
                result = bidrop.step(batch, loss_fn=poisoned if step == SKIPPED else None)
            if result.skipped:
                reference.skip()
                row = {"weight_err": reference.weight_error(held_weights(bidrop))}
            else:
                row = lockstep(reference, bidrop, reads, batch)
                row["kept_fraction"] = result.kept_fraction
                del row["mask"]
            rows.append({"step": step, "skipped": result.skipped, "reads": len(reads), **row})
        out.append({"rows": rows, "params": torch.cat([q.detach().reshape(-1) for q in model.parameters()]),
                    "skipped_steps": bidrop.skipped_steps, "step_index": bidrop.step_index})
    return out


def test_ddp_follows_the_reference_at_every_step(tmp_path):
    ranks = run_distributed(_ddp_scenarios, world_size=2, directory=str(tmp_path))
    for index, (kind, k, chunks) in enumerate(SCENARIOS):
        per_rank = [result[index] for result in ranks]
        for result in per_rank:
            for row in result["rows"]:
                label = (kind, k, chunks, row)
                assert row["skipped"] == (row["step"] == SKIPPED), label
                assert row["weight_err"] <= WEIGHT_BOUND, label  # a skipped step moved nothing either
                if not row["skipped"]:
                    assert row["reads"] == k and row["read_err"] <= 1e-6 and row["mask_hard_differs"] == 0, label
                    assert abs(row["kept_fraction"] - row["kept"] / row["N"]) < 2e-4, label
            assert result["skipped_steps"] == 1 and result["step_index"] == STEPS
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
