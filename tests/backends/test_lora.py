"""Bi-Drop on a peft LoRA model under DeepSpeed ZeRO 0-3, 2 real gloo ranks, one launch: at every
step the LoRA weights follow a float64 lockstep reference (tests/reference.py: its own passes, the
oracle's mask, its own optimizer), with the global threshold and the per-tensor one (a LoRA tensor
spanning both ranks' partitions); the frozen base stays bit for bit; by default exactly the LoRA
weights inside the blocks are eligible. And benchmarks/lora_selection.py at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bidrop_ds import BiDrop, BiDropConfig
from tests.distributed import run_distributed
from tests.models import VOCAB, tiny_llama
from tests.reference import Reference, eligible_layout, record_reads

pytest.importorskip("peft")
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
LR, MICRO = 0.5, 4  # plain SGD, so that the weights move by LR x the update
STEPS = 2  # lora_B starts at 0, so lora_A's gradient is 0 at step 0 and not after
# (ZeRO stage, threshold, k): global on every stage; per_tensor on the replica and on both partition
# kinds, with k = 2 (the scores where pass 2 lives) and k = 3 (the scores in the Welford statistics)
SETUPS = [(0, "global", 2), (1, "global", 2), (2, "global", 2), (3, "global", 2),
          (0, "per_tensor", 2), (2, "per_tensor", 2), (3, "per_tensor", 2), (3, "per_tensor", 3)]


def tiny_lora_llama(seed: int = 0):
    """A tiny 3-layer causal-LM Llama (no dropout of its own) with LoRA r=4 on q/v, lora_dropout 0.1
    (3 equal layers: the halves of ZeRO-1/2's flat partition split a layer's LoRA tensors)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed, causal_lm=True, attention_dropout=0.0, num_hidden_layers=3)
    torch.manual_seed(seed + 1)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    return get_peft_model(base, lora).train()


def ds_config(stage: int, world: int) -> dict:
    """fp32 ZeRO-`stage`, no gradient clipping, one micro-batch per step."""
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO * world, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def causal_batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (MICRO, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def _frozen(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in module.named_parameters() if not param.requires_grad}


def _lora_runs(rank: int, world_size: int) -> list[dict]:
    import deepspeed

    out = []
    for stage, threshold, k in SETUPS:
        model = tiny_lora_llama()
        trainable = [param for param in model.parameters() if param.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=LR),
                                          config=ds_config(stage, world_size))
        config = BiDropConfig(k=k, p=0.3, seed=5, threshold=threshold)
        bidrop = BiDrop(engine, config=config)
        fresh = tiny_lora_llama()
        reference = Reference(fresh, lambda params: torch.optim.SGD(params, lr=LR), config)
        partition = bidrop.backend.partition
        rows = []
        for step in range(STEPS):
            chunks = [causal_batch(100 * rank + step)]
            with record_reads(bidrop) as reads:
                result = bidrop.step(chunks)
            held = [(f.name, f.start, view) for f, view in zip(partition.fragments, partition.master_views())
                    if f.numel]
            passes, layout = reference.pass_gradients(chunks), eligible_layout(bidrop.backend)
            record = reference.step(passes, mask=reference.mask_of(reads, layout))
            rows.append({"read_err": reference.read_error(reads, layout, passes),
                         "weight_err": reference.weight_error(held), "mask_hard_differs": record.mask_hard_differs,
                         "kept": int(record.mask.sum()), "N": record.mask.numel(), "skipped": result.skipped,
                         "kept_fraction": result.kept_fraction, "threshold": result.threshold})
        frozen = _frozen(engine.module)
        with deepspeed.zero.GatheredParameters(list(frozen.values()), enabled=stage == 3):
            base_unchanged = all(torch.equal(frozen[name].detach().cpu(), param.detach())
                                 for name, param in _frozen(fresh).items())
        out.append({"stage": stage, "threshold": threshold, "k": k, "rows": rows, "base_unchanged": base_unchanged,
                    "frozen": len(frozen), "trainable": sorted(n for n, p in engine.module.named_parameters()
                                                               if p.requires_grad),
                    "eligible_held": sorted({f.name for f in bidrop.backend.eligible_fragments})})
        engine.destroy()
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def lora_runs() -> list[list[dict]]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return run_distributed(_lora_runs, world_size=2, timeout_s=600)


def test_lora_update_follows_the_float64_reference_under_zero(lora_runs):
    """Every step of every (stage, threshold): the passes read equal the reference's, the masks
    agree off the threshold's fp32 neighbourhood, and the LoRA master weights equal the reference's."""
    for runs in lora_runs:
        assert [(run["stage"], run["threshold"], run["k"]) for run in runs] == SETUPS
        for run in runs:
            for step, row in enumerate(run["rows"]):
                label = (run["stage"], run["threshold"], run["k"], step, row)
                assert not row["skipped"], label
                assert row["read_err"] <= 1e-6 and row["weight_err"] <= 1e-5, label
                assert row["mask_hard_differs"] == 0, label
                assert abs(row["kept_fraction"] * row["N"] - row["kept"]) <= 2, label
                assert (row["threshold"] is None) == (run["threshold"] == "per_tensor"), label


def test_frozen_base_is_bit_for_bit_unchanged(lora_runs):
    for runs in lora_runs:
        for run in runs:
            assert run["frozen"] > 0 and run["base_unchanged"], (run["stage"], run["threshold"], run["k"])


def test_default_eligible_set_is_the_lora_weights_in_the_blocks(lora_runs):
    """The default include (the blocks) over peft's names: every trainable parameter is a LoRA
    weight in a block, and together the ranks hold all of them as eligible; under ZeRO 1-3 some
    LoRA tensor is split between the ranks (the per-tensor threshold spans the partitions)."""
    for index, (stage, _, _) in enumerate(SETUPS):
        trainable = lora_runs[0][index]["trainable"]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert all(".layers." in n for n in trainable)
        held = [set(runs[index]["eligible_held"]) for runs in lora_runs]
        assert set.union(*held) == set(trainable), stage
        if stage > 0:
            assert held[0] & held[1], f"ZeRO-{stage}: no LoRA tensor spans both ranks"


def test_lora_selection_benchmark_at_a_tiny_size(tmp_path):
    """benchmarks/lora_selection.py end to end (1 seed, 1 step, the plain-model backend): at step 0
    lora_A's gradient is 0, so the global threshold updates lora_B only (0.6 of it: p = 0.3 of A and
    B of equal sizes), and per_tensor updates p of lora_B."""
    out = tmp_path / "lora_selection.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_selection.py"), "--seeds", "1", "--steps",
                           "1", "--pretrain_steps", "1", "--output_json", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert "| per_tensor |" in done.stdout
    assert summary["global, eps 1e-8"]["lora_A_first"] == 0.0
    assert summary["global, eps 1e-8"]["lora_B_first"] == pytest.approx(0.6, abs=0.01)
    assert summary["per_tensor"]["lora_B_first"] == pytest.approx(0.3, abs=0.01)
    assert summary["vanilla (k=1)"]["lora_B_first"] == 1.0
