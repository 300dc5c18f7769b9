"""The SFT recipe (`bidrop_ds.recipes.sft`, what launch/sft.py and `bidrop-sft` run) in one process, on a tiny
config-built Llama with the MiniLM vocabulary (tests/models.py), CPU, offline, with the flags a GPU user types (no
--use_cpu, no precision flag). Full fine-tuning with packing on prompt/completion files; LoRA on conversational rows
in a folder; the one-line refusals; the data formats. The 2-rank DeepSpeed ZeRO-3 run of the recipe is in
tests/integrations/test_trl.py (one launch with the Trainer-path checks).

The tiny command (also for the installed-wheel test): `tiny_command(model_folder, data_file, output_dir)`, i.e.
    bidrop-sft --model_name_or_path MODEL --dataset_name rows.jsonl --output_dir OUT \
        --max_steps 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --save_strategy no \
        --report_to none --disable_tqdm true --k 2 --p 0.3
with MODEL = tests.models.save_tiny_sft_model(folder) and rows.jsonl holding `{"prompt": ..., "completion": ...}`
lines (`write_rows`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from transformers import AutoModelForCausalLM  # noqa: E402

from bidrop_ds.recipes import sft  # noqa: E402
from tests.models import save_tiny_sft_model  # noqa: E402


def tiny_command(model: str | Path, data: str | Path, output_dir: str | Path) -> list[str]:
    """The smallest useful run: 2 Bi-Drop steps of 2 micro-batches of 2 rows, nothing saved but the final model."""
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(output_dir),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--k", "2", "--p", "0.3"]


def qa(i: int) -> dict[str, str]:
    return {"prompt": f"what is {i} plus {i}?", "completion": f" it is {2 * i}."}


def chat(i: int) -> dict[str, list[dict[str, str]]]:
    row = qa(i)
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["completion"].strip()}]}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(save_tiny_sft_model(tmp_path_factory.mktemp("tiny-llama")))


def test_full_fine_tuning_with_packing(tiny: Path, tmp_path: Path) -> None:
    """Prompt/completion files, --packing, an evaluation file: fp32 on CPU by itself, Bi-Drop logged, the saved
    model loads and has moved, the evaluation reports loss and perplexity."""
    train = write_rows(tmp_path / "train.jsonl", [qa(i) for i in range(16)])
    evaluation = write_rows(tmp_path / "eval.jsonl", [qa(i) for i in range(16, 20)])
    out = tmp_path / "out"
    metrics = sft.main([*tiny_command(tiny, train, out), "--eval_dataset", str(evaluation), "--packing",
                        "--max_length", "48", "--bidrop_seed", "1", "--logging_steps", "1"])
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-9)
    assert json.loads((out / "eval_results.json").read_text())["eval_perplexity"] == metrics["eval_perplexity"]
    saved = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny)
    assert saved.dtype == torch.float32  # fp32 training on a CPU-only machine, no flag needed
    assert not all(torch.equal(a, b) for a, b in zip(saved.parameters(), initial.parameters()))
    logs = [log for log in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in log]
    assert [log["bidrop_kept_fraction"] for log in logs] == pytest.approx([0.3, 0.3], abs=1e-3)


def test_lora_on_conversations_in_a_folder(tiny: Path, tmp_path: Path) -> None:
    """LoRA (q/v, r 4) on `messages` rows from a folder (train.jsonl, validation.jsonl): the model's own dropout 0,
    the LoRA dropout makes the passes differ; the output is an adapter; evaluation on the validation split."""
    from peft import PeftModel

    data = tmp_path / "chats"
    data.mkdir()
    write_rows(data / "train.jsonl", [chat(i) for i in range(16)])
    write_rows(data / "validation.jsonl", [chat(i) for i in range(16, 20)])
    out = tmp_path / "out"
    metrics = sft.main([*tiny_command(tiny, data, out), "--model_init_kwargs", '{"attention_dropout": 0.0}',
                        "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1",
                        "--lora_target_modules", "q_proj", "v_proj", "--learning_rate", "1e-2"])
    assert math.isfinite(metrics["eval_loss"]) and "eval_perplexity" in metrics
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    tuned = PeftModel.from_pretrained(base, out)
    lora_b = [p for name, p in tuned.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 4 and any(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at 0: it trained
    for name, p in tuned.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name


REFUSALS = [
    ("no dropout", ["--model_init_kwargs", '{"attention_dropout": 0.0}'],
     r"the model .* has no dropout \(its only dropout setting is attention_dropout=0.0\), so Bi-Drop's k = 2 passes "
     r"would be identical: raise it with --model_init_kwargs '\{\"attention_dropout\": 0.1\}', or train LoRA with "
     r"--use_peft --lora_dropout 0.1"),
    ("no LoRA dropout", ["--model_init_kwargs", '{"attention_dropout": 0.0}', "--use_peft", "--lora_dropout", "0"],
     r"has no dropout \(.*, and --lora_dropout is 0\).*set --lora_dropout above 0"),
    ("unknown columns", ["--dataset_name", "QUESTIONS"],
     r"the train data has none of the columns SFT trains on \(text, messages, conversations, prompt \+ completion, "
     r"input_ids\); its columns are question, answer"),
    ("bad Bi-Drop value", ["--p", "2"], r"BiDropConfig.p = 2.0 is not allowed: expected a number in \(0, 1\]"),
    ("missing split", ["--eval_dataset", "dev"], r"--eval_dataset dev: neither a data file .* nor a split of .*"
                                                 r"\(its splits are train\)"),
]


@pytest.mark.parametrize("case, extra, message", REFUSALS, ids=[case for case, *_ in REFUSALS])
def test_refusals_are_one_line(tiny: Path, tmp_path: Path, case: str, extra: list[str], message: str) -> None:
    train = write_rows(tmp_path / "train.jsonl", [qa(i) for i in range(4)])
    questions = write_rows(tmp_path / "questions.jsonl", [{"question": "why?", "answer": "because."}])
    extra = [str(questions) if value == "QUESTIONS" else value for value in extra]
    with pytest.raises(SystemExit) as stop:
        sft.main([*tiny_command(tiny, train, tmp_path / "out"), *extra])
    text = str(stop.value)
    assert text.startswith("sft.py: error: ") and "\n" not in text, text
    assert re.search(message, text), text
    assert not (tmp_path / "out").exists()  # refused before training


def test_data_formats(tmp_path: Path) -> None:
    """One file per format (csv, parquet, json) loads as the train split; a hub name offline fails in one line."""
    import datasets

    rows = [{"text": f"{i} plus {i} is {2 * i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "rows.csv", index=False)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    for name in ("rows.csv", "rows.parquet", "rows.json"):
        script_args, *_, mixture, eval_args, _ = sft.parse(["--dataset_name", str(tmp_path / name), "--output_dir",
                                                           str(tmp_path / "out")])
        train, evaluation = sft.load_data(script_args, mixture, eval_args)
        assert train["text"] == [row["text"] for row in rows] and evaluation is None, name
    script_args, *_, mixture, eval_args, _ = sft.parse(["--dataset_name", "nobody/no-such-set", "--output_dir",
                                                       str(tmp_path / "out")])
    with pytest.raises(sft.RecipeError, match=r"--dataset_name nobody/no-such-set: cannot load it"):
        sft.load_data(script_args, mixture, eval_args)


def test_bidrop_flags(tmp_path: Path) -> None:
    """BiDropConfig's fields as flags (`--seed` stays TRL's: Bi-Drop's is --bidrop_seed); a switch alone means true;
    --bidrop_config JSON supplies defaults that flags override."""
    (tmp_path / "bidrop.json").write_text(json.dumps({"k": 3, "p": 0.5, "rescale": True}))
    *_, training_args, _, _, _, bidrop_args = sft.parse(
        ["--output_dir", str(tmp_path), "--seed", "7", "--bidrop_seed", "4", "--p", "0.2", "--allow_no_dropout",
         "--include", "lora_A", "lora_B", "--bidrop_config", str(tmp_path / "bidrop.json")])
    config = sft.bidrop_config_from(bidrop_args)
    assert training_args.seed == 7 and not training_args.bf16  # fp32 on a CPU-only machine
    assert (config.seed, config.k, config.p, config.rescale, config.allow_no_dropout, config.include) == \
        (4, 3, 0.2, True, True, ("lora_A", "lora_B"))


def test_trl_config_yaml(tmp_path: Path) -> None:
    """TRL's --config YAML sets TRL's and Bi-Drop's fields alike; the command line overrides it."""
    (tmp_path / "sft.yaml").write_text("learning_rate: 0.0001\nk: 3\np: 0.5\nlora_r: 4\n")
    _, training_args, model_args, _, _, bidrop_args = sft.parse(
        ["--config", str(tmp_path / "sft.yaml"), "--output_dir", str(tmp_path), "--p", "0.2"])
    config = sft.bidrop_config_from(bidrop_args)
    assert (training_args.learning_rate, model_args.lora_r, config.k, config.p) == (1e-4, 4, 3, 0.2)


LAUNCHERS = {
    # accelerate's own launcher and config file, ZeRO-3 (model partitioned by zero.Init), LoRA on the recipe's flags
    "accelerate zero3 lora": (["accelerate", "launch", "--config_file", "ds_configs/accelerate_zero3.yaml", "-m",
                               "bidrop_ds.recipes.sft"],
                              ["--model_init_kwargs", '{"attention_dropout": 0.0}', "--use_peft", "--lora_r", "4",
                               "--lora_dropout", "0.1", "--lora_target_modules", "q_proj", "v_proj"]),
    # DeepSpeed's launcher, ZeRO-2 with optimizer offload (bf16, DeepSpeedCPUAdam), full fine-tuning
    "deepspeed zero2 offload": (["deepspeed", "--num_gpus", "2", "--module", "bidrop_ds.recipes.sft"],
                                ["--deepspeed", "ds_configs/zero2_offload.json"]),
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_the_recipe_under_accelerate_and_deepspeed_launchers(tiny: Path, tmp_path: Path, launcher: str) -> None:
    """The command a GPU user types (plus DS_ACCELERATOR=cpu) under the two launchers that torchrun's test in
    tests/integrations/test_trl.py does not cover: 2 ranks train, Bi-Drop keeps its fraction, the output loads."""
    import os
    import shutil
    import sys

    from tests.launching import run_in_session

    command, extra = LAUNCHERS[launcher]
    bindir = Path(sys.executable).parent
    if not (bindir / command[0]).exists() and shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    train = write_rows(tmp_path / "train.jsonl", [qa(i) for i in range(16)])
    out = tmp_path / "out"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = run_in_session([str(bindir / command[0]), *command[1:], *tiny_command(tiny, train, out), *extra,
                           "--logging_steps", "1"], env, timeout=300, what=launcher)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    logs = [log for log in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in log]
    assert [log["bidrop_kept_fraction"] for log in logs] == pytest.approx([0.3, 0.3], abs=1e-3)
    saved = "adapter_config.json" if "lora" in launcher else "model.safetensors"
    assert (out / saved).is_file(), sorted(p.name for p in out.iterdir())
