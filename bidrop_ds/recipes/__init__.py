"""Installed recipes: each reads top to bottom (parse, build, train, report) over `bidrop_ds.training`.

- `bidrop_ds.recipes.finetune`: sequence classification on a task or your own data, in one process or
  on DeepSpeed ranks (console script `bidrop-finetune`; `launch/finetune.py` in a clone).
- `bidrop_ds.recipes.sft`: supervised fine-tuning of a decoder LLM on TRL (console script `bidrop-sft`).

Run one as a module under any launcher: `python -m bidrop_ds.recipes.finetune`,
`torchrun --nproc_per_node 2 -m bidrop_ds.recipes.finetune --deepspeed ...`,
`deepspeed --module bidrop_ds.recipes.finetune ...`, `accelerate launch -m bidrop_ds.recipes.finetune ...`.
"""
