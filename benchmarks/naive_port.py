"""The naive port of Bi-Drop onto a DeepSpeed engine: the anchor the plugin is measured against.

This is what a user would write with DeepSpeed's *public* API only (no private partition state):

- every pass is made an accumulation boundary, since `deepspeed.utils.safe_get_full_grad` reads
  ZeRO-1/2 gradients only at a boundary ("Gradients are only available immediately after backward
  and before engine step"); under ZeRO-3 it works after any backward (it all-gathers the fp32
  gradient partition), and the boundary changes nothing there;
- after each pass, `safe_get_full_grad(p).clone()` of every parameter (so k full copies of the
  model's gradient per rank: ZeRO-1/2 assemble it with one all-reduce of the full parameter per
  parameter, ZeRO-3 with one all-gather per parameter), then `safe_set_full_grad(p, 0)` so that the
  next pass does not accumulate onto it;
- the same formulas as the specification: population std over the stacked passes
  (`torch.std(unbiased=False)`), product score |m|/(s+eps) * |m|/(|theta|+eps) with theta from
  `safe_get_full_fp32_param`, eligible = `BiDropConfig().is_eligible(name)`, threshold = the n-th
  largest of the concatenated eligible scores by `torch.kthvalue` (n = max(1, ceil(p N)); every rank
  holds the full scores, so no gather is needed), mask = score >= tau, ineligible always kept;
- `safe_set_full_grad(p, m * mask)` then `engine.step()`.

`python benchmarks/naive_port.py` under torchrun checks that one naive step and one plugin step
(seed=None, same global RNG, hence the same dropout) leave the same parameters.
"""

from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_grad

from bidrop_ds import BiDropConfig
from bidrop_ds.core import kept_count


def full_numel(param: torch.nn.Parameter) -> int:
    return int(param.ds_numel) if hasattr(param, "ds_numel") else param.numel()


class NaiveBiDrop:
    """Bi-Drop through deepspeed.utils.safe_get_full_grad / safe_set_full_grad (public API only)."""

    def __init__(self, engine, config: BiDropConfig | None = None) -> None:
        self.engine = engine
        self.config = config if config is not None else BiDropConfig()
        self.named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
        self.eligible = [self.config.is_eligible(name) for name, _ in self.named]
        total = sum(full_numel(p) for (_, p), ok in zip(self.named, self.eligible) if ok)
        self.n = kept_count(self.config.p, total)
        self.total = total
        self.copies_bytes = 0  # bytes of the k full gradient copies held at the end of the passes

    def step(self, batch) -> float:
        engine, k, eps = self.engine, self.config.k, self.config.eps
        passes: list[list[torch.Tensor]] = [[] for _ in self.named]
        losses = []
        for j in range(k):
            engine.set_gradient_accumulation_boundary(True)  # safe_get_full_grad needs it (ZeRO-1/2)
            loss = engine(**batch).loss
            engine.backward(loss)
            losses.append(loss.detach())
            for i, (_, p) in enumerate(self.named):
                grad = safe_get_full_grad(p)
                passes[i].append(grad.detach().float().clone())
                if j < k - 1:
                    safe_set_full_grad(p, torch.zeros_like(passes[i][-1]))  # next pass starts from 0
        self.copies_bytes = sum(g.nbytes for per in passes for g in per)
        means, scores = [], []
        for i, (_, p) in enumerate(self.named):
            stacked = torch.stack(passes[i])
            mean = stacked.mean(0)
            means.append(mean)
            if self.eligible[i]:
                std = stacked.std(0, unbiased=False)
                theta = safe_get_full_fp32_param(p).float()
                scores.append((mean.abs() / (std + eps)) * (mean.abs() / (theta.abs() + eps)))
            else:
                scores.append(None)
            passes[i] = []  # a user would drop the copies as they go
        flat = torch.cat([s.reshape(-1) for s in scores if s is not None])
        tau = torch.kthvalue(flat, flat.numel() - self.n + 1).values
        del flat
        for i, (_, p) in enumerate(self.named):
            update = means[i] if scores[i] is None else means[i] * (scores[i] >= tau)
            safe_set_full_grad(p, update)
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
        return torch.stack(losses).float().mean().item()


def _check() -> None:
    """One naive step against one plugin step on twin engines (same init, batch and dropout), ZeRO-2 and 3."""
    import deepspeed

    from bidrop_ds.comm import close_process_group

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (2, 3):
        _check_stage(stage)  # destroys its engines; their references die on return
    close_process_group()


def _check_stage(stage: int) -> None:
    """Rank 0 prints the largest parameter difference after one step of each twin under ZeRO-`stage`."""
    import deepspeed
    import torch.distributed as dist
    from transformers import BertConfig, BertForSequenceClassification

    from bidrop_ds import BiDrop

    engines = []
    for _ in range(2):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64, num_labels=2))
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                  "train_batch_size": 4 * dist.get_world_size(), "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
        engines.append(engine)
    g = torch.Generator().manual_seed(dist.get_rank())
    batch = {"input_ids": torch.randint(0, 512, (4, 16), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}
    plugin, naive = BiDrop(engines[0], config=BiDropConfig(k=2, p=0.3)), NaiveBiDrop(engines[1], BiDropConfig(k=2, p=0.3))
    torch.manual_seed(123 + dist.get_rank())
    plugin.step(batch)
    torch.manual_seed(123 + dist.get_rank())
    naive.step(batch)
    worst = 0.0
    for (name, a), (_, b) in zip(engines[0].module.named_parameters(), engines[1].module.named_parameters()):
        wa, wb = safe_get_full_fp32_param(a), safe_get_full_fp32_param(b)
        worst = max(worst, (wa - wb).abs().max().item())
    if dist.get_rank() == 0:
        print(f"ZeRO-{stage}: max |plugin - naive| over parameters after one step (SGD lr 1): {worst:.3g}")
    for engine in engines:
        engine.destroy()


if __name__ == "__main__":
    _check()
