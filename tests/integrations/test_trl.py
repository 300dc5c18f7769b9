"""BiDropSFTTrainer (TRL integration) on a tiny config-built Llama with the MiniLM vocabulary, CPU, no downloads.

In one process: k=1 is TRL's SFTTrainer bit for bit (losses, weights); TRL's metrics (num_tokens,
mean_token_accuracy, entropy) are counted once per step at k=2; with packing the k passes of a step see the same
packed batch; the mixin works for RewardTrainer; TRL stays optional. On 2 real ranks (torchrun, gloo; this file is
the rank script, one launch): a BiDropSFTTrainer on DeepSpeed ZeRO-3, its model built inside zero.Init, takes the
first step a hand-run BiDrop takes on the same weights and chunks; then the SFT recipe trains on ZeRO-3 and writes
16-bit gathered weights that from_pretrained loads.

About the loss scaling: as in test_hf_trainer, the tests that compare with a hand-run BiDrop set
`model_accepts_loss_kwargs = False`, so each micro-batch's SFT loss is its own mean token loss, divided by the
window size (the hand-run's chunk mean / chunks).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import LlamaForSequenceClassification  # noqa: E402
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402

from bidrop_ds import BiDrop, BiDropConfig  # noqa: E402
from bidrop_ds.integrations.trl import BiDropRewardTrainer, BiDropSFTTrainer  # noqa: E402
from tests.integrations.test_hf_trainer import LR, approx_logged_loss, params  # noqa: E402
from tests.launching import run_in_session  # noqa: E402
from tests.models import save_tiny_sft_model, sft_tokenizer, tiny_llama_config, tiny_sft_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRAIN_METRICS = ("num_tokens", "mean_token_accuracy", "entropy")


def qa_rows(n: int = 16) -> Dataset:
    """Prompt/completion rows of different lengths (so padding and token counts vary between batches)."""
    return Dataset.from_list([{"prompt": f"what is {i} plus {i}" + " please" * (i % 3) + "?",
                               "completion": f" it is {2 * i}."} for i in range(n)])


def sft_args(output_dir: Path | str, **overrides) -> SFTConfig:
    """2 micro-batches of 2 per step, constant LR, no clipping, fp32 on CPU, logs every step, quiet."""
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=2, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, bf16=False,
                  use_cpu=True, seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


class Recording:
    """Mixed into a trainer: keeps every compute_loss input (a copy) and TRL's metric lists as each log saw them."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.losses_seen = getattr(self, "losses_seen", [])
            self.losses_seen.append({key: value.detach().clone() for key, value in inputs.items()
                                     if isinstance(value, torch.Tensor)})
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            self.metric_counts = getattr(self, "metric_counts", [])
            self.metric_counts.append({key: len(self._metrics["train"][key]) for key in TRAIN_METRICS})
        return super().log(logs, *args, **kwargs)


class RecordingSFT(Recording, SFTTrainer):
    pass


class RecordingBiDropSFT(Recording, BiDropSFTTrainer):
    pass


def train_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log]


@pytest.fixture(scope="module")
def tokenizer():
    return sft_tokenizer()


def test_k1_is_the_vanilla_sft_trainer(tmp_path: Path, tokenizer) -> None:
    """k=1 against SFTTrainer: 2 steps of 2 micro-batches, TRL's token-count loss scaling, clipping on."""
    args = sft_args(tmp_path, max_grad_norm=0.05)
    runs = []
    for make in (lambda m: SFTTrainer(m, args=args, train_dataset=qa_rows(), processing_class=tokenizer),
                 lambda m: BiDropSFTTrainer(m, args=args, train_dataset=qa_rows(), processing_class=tokenizer,
                                            bidrop_config=BiDropConfig(k=1))):
        model = tiny_sft_llama(tokenizer)
        trainer = make(model)
        trainer.train()
        runs.append((params(model), train_logs(trainer)))
    (vanilla, vanilla_logs), (bidrop, bidrop_logs) = runs
    assert all(torch.equal(a, b) for a, b in zip(vanilla, bidrop))
    assert len(bidrop_logs) == 2
    for key in ("loss", *TRAIN_METRICS):
        assert [log[key] for log in bidrop_logs] == approx_logged_loss([log[key] for log in vanilla_logs]), key


def test_trl_metrics_counted_once_per_step(tmp_path: Path, tokenizer) -> None:
    """k=2: each micro-batch adds its tokens once (the sum of the attention masks the passes saw, once) and one
    entry to mean_token_accuracy and entropy; the first step's values are the vanilla first step's (same weights,
    and with seed None the first pass draws what the vanilla forward draws)."""
    vanilla = RecordingSFT(tiny_sft_llama(tokenizer), args=sft_args(tmp_path), train_dataset=qa_rows(),
                           processing_class=tokenizer)
    vanilla.train()
    trainer = RecordingBiDropSFT(tiny_sft_llama(tokenizer), args=sft_args(tmp_path), train_dataset=qa_rows(),
                                 processing_class=tokenizer, bidrop_config=BiDropConfig(k=2, p=0.3))
    trainer.train()
    assert len(trainer.losses_seen) == 2 * len(vanilla.losses_seen) == 8  # 2 steps x 2 passes x 2 micro-batches
    steps = [trainer.losses_seen[:4], trainer.losses_seen[4:]]
    tokens, expected = 0, []
    for calls in steps:
        tokens += sum(int(call["attention_mask"].sum()) for call in calls[:2])  # one pass's micro-batches
        expected.append(tokens)
    logs = train_logs(trainer)
    assert [log["num_tokens"] for log in logs] == expected == [log["num_tokens"] for log in train_logs(vanilla)]
    assert trainer.metric_counts == vanilla.metric_counts == [{key: (1 if key == "num_tokens" else 2)
                                                              for key in TRAIN_METRICS}] * 2
    for key in ("mean_token_accuracy", "entropy"):
        assert logs[0][key] == approx_logged_loss(train_logs(vanilla)[0][key]), key


def test_packed_batches_are_the_same_in_every_pass(tmp_path: Path, tokenizer) -> None:
    """--packing (TRL's default BFD, padding-free): rows packed into one sequence per micro-batch; pass 2 of a step
    gets exactly the packed micro-batches pass 1 got."""
    trainer = RecordingBiDropSFT(tiny_sft_llama(tokenizer), args=sft_args(tmp_path, packing=True, max_length=64),
                                 train_dataset=qa_rows(), processing_class=tokenizer,
                                 bidrop_config=BiDropConfig(k=2, p=0.3, seed=1))
    trainer.train()
    assert len(trainer.losses_seen) == 8
    first = trainer.losses_seen[0]
    assert first["input_ids"].shape[0] == 1 and int((first["position_ids"] == 0).sum()) > 1  # several rows packed
    for calls in (trainer.losses_seen[:4], trainer.losses_seen[4:]):
        for one, two in zip(calls[:2], calls[2:]):
            assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
    assert trainer.losses_seen[0]["input_ids"].shape != trainer.losses_seen[4]["input_ids"].shape or \
        not torch.equal(trainer.losses_seen[0]["input_ids"], trainer.losses_seen[4]["input_ids"])  # steps differ


def test_conversational_prompt_completion(tmp_path: Path, tokenizer) -> None:
    """Conversational prompt/completion rows: TRL renders them with the chat template and learns the completion
    only; every pass of a step gets those labels (-100 over the prompt)."""
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": f"what is {i} plus {i}?"}],
                               "completion": [{"role": "assistant", "content": f"it is {2 * i}."}]}
                              for i in range(8)])
    trainer = RecordingBiDropSFT(tiny_sft_llama(tokenizer), args=sft_args(tmp_path, max_steps=1), train_dataset=rows,
                                 processing_class=tokenizer, bidrop_config=BiDropConfig(k=2, p=0.3))
    trainer.train()
    first, again = trainer.losses_seen[0], trainer.losses_seen[2]
    assert torch.equal(first["labels"], again["labels"])
    learned = (first["labels"][0] != -100).nonzero()
    start, end = learned.min().item(), learned.max().item() + 1  # right padding: the labels are one span

    def squeeze(ids: torch.Tensor) -> str:
        return tokenizer.decode(ids).replace(" ", "")

    assert squeeze(first["input_ids"][0, :start]).startswith("user:whatis")
    assert squeeze(first["input_ids"][0, :start]).endswith("assistant:")  # the rendered prompt is not learned
    assert squeeze(first["labels"][0, start:end]).startswith("itis") and (first["labels"][0, start:end] != -100).all()
    assert train_logs(trainer)[0]["bidrop_kept_fraction"] == pytest.approx(0.3, abs=1e-3)


def test_reward_trainer(tmp_path: Path, tokenizer) -> None:
    """The mixin on TRL's RewardTrainer (a sequence classifier): k=1 is vanilla, k=2 keeps p of the elements."""
    pairs = Dataset.from_list([{"chosen": f"{i} plus {i} is {2 * i}", "rejected": f"{i} plus {i} is {i}"}
                               for i in range(16)])
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                        max_steps=2, learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
                        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, bf16=False,
                        use_cpu=True, seed=0)

    def run(trainer_class, **extra):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(tiny_llama_config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_labels=1,
            pad_token_id=tokenizer.pad_token_id, attention_dropout=0.1))
        trainer = trainer_class(model, args=args, train_dataset=pairs, processing_class=tokenizer, **extra)
        trainer.train()
        return params(model), train_logs(trainer)

    vanilla, vanilla_logs = run(RewardTrainer)
    k1, _ = run(BiDropRewardTrainer, bidrop_config=BiDropConfig(k=1))
    _, k2_logs = run(BiDropRewardTrainer, bidrop_config=BiDropConfig(k=2, p=0.3))
    assert all(torch.equal(a, b) for a, b in zip(vanilla, k1))
    assert [log["num_tokens"] for log in k2_logs] == [log["num_tokens"] for log in vanilla_logs]
    assert [log["bidrop_kept_fraction"] for log in k2_logs] == pytest.approx([0.3, 0.3], abs=1e-3)


def test_trl_stays_optional() -> None:
    """Without trl importable, `import bidrop_ds` and `bidrop_ds.integrations` work; the TRL trainers are lazy."""
    code = ("import sys; sys.modules['trl'] = None; import bidrop_ds, bidrop_ds.integrations\n"
            "try:\n    bidrop_ds.integrations.BiDropSFTTrainer\nexcept ImportError as err:\n    print('refused:', err)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "refused: import of trl halted" in done.stdout
    import bidrop_ds.integrations

    assert bidrop_ds.integrations.BiDropSFTTrainer is BiDropSFTTrainer


# ----- 2 DeepSpeed ranks (torchrun): this file is the rank script -----------------------------------------------

ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
         "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}


def test_two_ranks_zero3(tmp_path: Path) -> None:
    """One launch: the Trainer path against a hand-run BiDrop (ZeRO-3), then the recipe on ZeRO-3."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__)), "--out", str(out), "--workdir", str(tmp_path)]
    done = run_in_session(command, env, 300, "the 2-rank run")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "terminate called" not in done.stderr
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["stage"] == 3 and result["built_partitioned"]
    assert result["global_step"] == result["bidrop_steps"] == result["engine_global_steps"] == 2
    assert result["kept"] == pytest.approx([0.3, 0.3], abs=0.01)
    # TRL's default gradient checkpointing recomputes each forward with the same dropout draws: the hand-run has none
    assert result["gradient_checkpointing"] and result["first_step_max_diff"] <= 1e-6
    assert result["first_step_loss"] == approx_logged_loss(result["hand_loss"])
    # TRL's token count, once per step over both ranks: the attention masks of one pass's micro-batches
    assert result["num_tokens"] == result["expected_tokens"]

    # the recipe's output: full 16-bit weights gathered from the ZeRO-3 partitions, trained, loadable
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "recipe-out")
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert [p.shape for p in saved.parameters()] == [p.shape for p in initial.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(saved.parameters(), initial.parameters()))
    metrics = json.loads((tmp_path / "recipe-out" / "eval_results.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-6)


def rank_main(argv: list[str]) -> None:
    """Rank script: (1) a BiDropSFTTrainer on ZeRO-3 fp32 (model built inside zero.Init) for 2 steps, and a hand-run
    BiDrop on a fresh engine fed the chunks this rank saw in step 1; (2) the SFT recipe, 2 steps on ZeRO-3, with an
    evaluation file. Rank 0 writes the numbers."""
    import argparse

    import deepspeed
    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, TrainerCallback

    from bidrop_ds.recipes import sft

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    opts = parser.parse_args(argv)
    workdir = Path(opts.workdir)
    torch.set_num_threads(1)
    config = BiDropConfig(k=2, p=0.3, seed=3)
    tokenizer = sft_tokenizer()
    # the recipe's SFTConfig does the CPU set-up (a DeepSpeed-flavoured gloo state); before from_pretrained, so
    # that the model is built partitioned
    args = sft.RecipeSFTConfig(output_dir=str(workdir / "trainer-out"), per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, max_steps=2, learning_rate=LR,
                               lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                               report_to="none", disable_tqdm=True, seed=0, optim="adamw_torch",
                               deepspeed=ZERO3)
    if dist.get_rank() == 0:
        save_tiny_sft_model(workdir / "tiny")
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(workdir / "tiny")
    built_partitioned = all(p.numel() == 0 and hasattr(p, "ds_numel") for p in model.parameters())

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with deepspeed.zero.GatheredParameters(list(model.parameters())):
                    self.params = params(model)

    first = FirstStep()
    trainer = RecordingBiDropSFT(model, args=args, train_dataset=qa_rows(32), processing_class=tokenizer,
                                 callbacks=[first], bidrop_config=config)
    trainer.model_accepts_loss_kwargs = False  # see the module docstring
    trainer.train()
    engine = trainer.model_wrapped
    logs = train_logs(trainer)
    chunks = trainer.losses_seen[:2]  # step 1, pass 1: the micro-batches (chunks) this rank trained on
    # TRL's token count over both ranks: the attention masks of one pass's micro-batches, step by step
    local_tokens = torch.tensor([sum(int(c["attention_mask"].sum()) for c in trainer.losses_seen[i:i + 2])
                                 for i in (0, 4)])
    dist.all_reduce(local_tokens)
    result = {"world": dist.get_world_size(), "stage": engine.zero_optimization_stage(),
              "built_partitioned": built_partitioned, "global_step": trainer.state.global_step,
              "bidrop_steps": trainer.bidrop.step_index, "engine_global_steps": engine.global_steps,
              "kept": [log["bidrop_kept_fraction"] for log in logs], "first_step_loss": logs[0]["loss"],
              "num_tokens": [log["num_tokens"] for log in logs],
              "expected_tokens": [float(v) for v in local_tokens.cumsum(0).tolist()],
              "gradient_checkpointing": engine.module.is_gradient_checkpointing}
    engine.destroy()
    del engine, trainer
    gc.collect()

    hand_model = AutoModelForCausalLM.from_pretrained(workdir / "tiny")  # partitioned: the ZeRO-3 config is live
    hand_model.train()
    optimizer = torch.optim.AdamW(hand_model.parameters(), lr=LR, weight_decay=0.0)
    hand_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 8,
                   "gradient_clipping": 0.0, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    wrapped, *_ = deepspeed.initialize(model=hand_model, optimizer=optimizer, config=hand_config)
    hand = BiDrop(wrapped, config=config).step([{k: v for k, v in c.items() if k != "use_cache"} for c in chunks])
    loss = torch.tensor([hand.loss], dtype=torch.float64)
    dist.all_reduce(loss)  # the logged loss is the mean over ranks
    result["hand_loss"] = loss.item() / dist.get_world_size()
    with deepspeed.zero.GatheredParameters(list(wrapped.module.parameters())):
        hand_params = params(wrapped.module)
    result["first_step_max_diff"] = max((a - b).abs().max().item() for a, b in zip(first.params, hand_params))
    wrapped.destroy()
    del wrapped, hand_model, optimizer
    gc.collect()

    # (2) the recipe, as a user runs it under torchrun
    data = workdir / "qa.jsonl"
    if dist.get_rank() == 0:
        rows = qa_rows(24).to_list()
        data.write_text("".join(json.dumps(row) + "\n" for row in rows[:16]))
        (workdir / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[16:]))
        Path(opts.out).write_text(json.dumps(result))
        print("RESULT", json.dumps(result))
    dist.barrier()
    AcceleratorState._reset_state()  # a new process would start without part (1)'s DeepSpeed plugin
    sft.main(["--model_name_or_path", str(workdir / "tiny"), "--dataset_name", str(data),
              "--eval_dataset", str(workdir / "eval.jsonl"), "--output_dir", str(workdir / "recipe-out"),
              "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
              "--deepspeed", str(ROOT / "ds_configs" / "zero3_fp32.json"), "--k", "2", "--p", "0.3"])


if __name__ == "__main__":
    rank_main(sys.argv[1:])
