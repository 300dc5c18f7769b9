"""How Bi-Drop's selection treats LoRA's two factors: the fraction of lora_A and lora_B elements
updated at the first and the last step, and the final eval loss, under the global threshold, the
per-tensor one, and a larger eps, against vanilla LoRA (k = 1).

    OMP_NUM_THREADS=1 python benchmarks/lora_selection.py                 # ~2-5 minutes on one core
    python benchmarks/lora_selection.py --seeds 1 --steps 5 --pretrain_steps 20   # a quick look

The set-up is an SFT run in miniature, on one process: a config-built Llama (hidden 64, 2 layers,
no dropout of its own) is first trained in full on a copy task (prompt: 8 digits, completion: the
same digits; loss on the completion only), then fine-tuned with peft LoRA (r = 8 on q_proj and
v_proj, lora_dropout 0.1, AdamW) on a shifted task (completion: each digit + 3 mod 10) for --steps
steps, Bi-Drop k = 2, p = 0.3. peft initialises lora_B to 0, so at the first step the scaling
factor |m| / (|theta| + eps) of every lora_B element is |m| / eps, while lora_A's gradient is
exactly 0 (it only flows through lora_B). "Updated" is the fraction of a factor's elements whose
written gradient is nonzero (read in an optimizer pre-step hook). Each setting runs --seeds seeds
(the same data and base per seed); the table shows their mean (eval loss: mean and spread).
Writes benchmarks/results/lora_selection.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bidrop_ds import BiDrop, BiDropConfig  # noqa: E402

DIGITS, BOS, SEP = 10, 10, 11
LENGTH = 8
# name -> BiDropConfig settings (k = 1: vanilla LoRA, the reference for the eval loss)
SETTINGS = {
    "vanilla (k=1)": dict(k=1),
    "global, eps 1e-8": dict(k=2, threshold="global"),
    "global, eps 1e-3": dict(k=2, threshold="global", eps=1e-3),
    "per_tensor": dict(k=2, threshold="per_tensor"),
}


def batch(size: int, shift: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """[BOS] d1..d8 [SEP] (d1+shift)..(d8+shift) mod 10; labels on the completion only."""
    digits = torch.randint(0, DIGITS, (size, LENGTH), generator=generator)
    ids = torch.cat([torch.full((size, 1), BOS), digits, torch.full((size, 1), SEP), (digits + shift) % DIGITS], 1)
    labels = ids.clone()
    labels[:, :LENGTH + 2] = -100
    return {"input_ids": ids, "labels": labels}


def base_model(args: argparse.Namespace, seed: int):
    """The config-built Llama, trained in full on the copy task."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=12, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         attention_dropout=0.0)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1000 + seed)
    for _ in range(args.pretrain_steps):
        model(**batch(32, 0, generator)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@torch.no_grad()
def eval_loss(model, eval_batches: list[dict]) -> float:
    model.eval()
    loss = statistics.fmean(model(**b).loss.item() for b in eval_batches)
    model.train()
    return loss


def run(base, settings: dict, args: argparse.Namespace, seed: int) -> dict:
    """LoRA fine-tuning of a copy of `base` on the shifted task; per step, the updated fraction of each factor."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                            target_modules=["q_proj", "v_proj"])).train()
    factors = {name: [p for n, p in model.named_parameters() if p.requires_grad and f".{name}." in n]
               for name in ("lora_A", "lora_B")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    updated: dict[str, list[float]] = {name: [] for name in factors}

    def record(*_):
        for name, params in factors.items():
            nonzero = sum(int(torch.count_nonzero(p.grad)) for p in params)
            updated[name].append(nonzero / sum(p.numel() for p in params))

    optimizer.register_step_pre_hook(record)
    bidrop = BiDrop(model, optimizer, config=BiDropConfig(p=args.p, seed=seed, **settings))
    generator = torch.Generator().manual_seed(2000 + seed)
    eval_generator = torch.Generator().manual_seed(3000 + seed)
    eval_batches = [batch(64, args.shift, eval_generator) for _ in range(4)]
    start = time.perf_counter()
    for _ in range(args.steps):
        bidrop.step(batch(args.batch, args.shift, generator))
        optimizer.zero_grad()
    return {"updated": updated, "eval_loss": eval_loss(model, eval_batches), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--shift", type=int, default=3)
    parser.add_argument("--output_json", default=str(ROOT / "benchmarks" / "results" / "lora_selection.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    base_losses = []
    for seed in range(args.seeds):
        base = base_model(args, seed)
        base_losses.append(eval_loss(base, [batch(64, args.shift, torch.Generator().manual_seed(3000 + seed))
                                            for _ in range(4)]))
        for name, settings in SETTINGS.items():
            results[name].append(run(base, settings, args, seed))
            print(f"seed {seed} {name}: eval loss {results[name][-1]['eval_loss']:.4f}", flush=True)
    print(f"\nLoRA r=8 on q/v, lora_dropout 0.1, p={args.p}, {args.steps} steps, {args.seeds} seeds; eval loss "
          f"before LoRA {statistics.fmean(base_losses):.3f}. Updated fraction of each factor (mean over seeds):\n")
    print("| setting | lora_A step 0 | lora_A last | lora_B step 0 | lora_B last | eval loss (mean +- sd) |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, runs in results.items():
        row = {f"{factor}_{when}": statistics.fmean(r["updated"][factor][index] for r in runs)
               for factor in ("lora_A", "lora_B") for when, index in (("first", 0), ("last", -1))}
        losses = [r["eval_loss"] for r in runs]
        row["eval_loss_mean"] = statistics.fmean(losses)
        row["eval_loss_sd"] = statistics.stdev(losses) if len(losses) > 1 else 0.0
        summary[name] = row
        print(f"| {name} | {row['lora_A_first']:.2f} | {row['lora_A_last']:.2f} | {row['lora_B_first']:.2f} | "
              f"{row['lora_B_last']:.2f} | {row['eval_loss_mean']:.4f} +- {row['eval_loss_sd']:.4f} |")
    Path(args.output_json).write_text(json.dumps({
        "command": "python " + " ".join(["benchmarks/lora_selection.py", *sys.argv[1:]]), "args": vars(args),
        "eval_loss_before_lora": base_losses, "summary": summary,
        "per_step_updated": {name: [r["updated"] for r in runs] for name, runs in results.items()},
        "eval_losses": {name: [r["eval_loss"] for r in runs] for name, runs in results.items()}}, indent=1))
    print(f"\nwrote {args.output_json}")


if __name__ == "__main__":
    main()
