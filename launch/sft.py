"""Supervised fine-tuning of a decoder LLM with Bi-Drop on TRL's SFTTrainer: the recipe
`bidrop_ds.recipes.sft` (installed as `bidrop-sft`), started from a clone. `trl sft`'s flags plus Bi-Drop's:

    python launch/sft.py --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara \
        --model_init_kwargs '{"attention_dropout": 0.1}' --k 2 --p 0.3 --output_dir qwen-sft
    torchrun --nproc_per_node 2 launch/sft.py ... --deepspeed ds_configs/zero3_bf16.json
    deepspeed --num_gpus 2 launch/sft.py ... --use_peft --lora_r 16 --lora_target_modules q_proj v_proj

Every flag, output and exit code is the recipe's: `python launch/sft.py --help`; docs/llm.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bidrop_ds.recipes.sft import cli  # noqa: E402

if __name__ == "__main__":
    cli()
