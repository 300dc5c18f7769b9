r"""Fine-tune a sequence classifier with Bi-Drop, in one process or on DeepSpeed ranks: the recipe
`bidrop_ds.recipes.finetune` (installed as `bidrop-finetune`), started from a clone.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python launch/finetune.py
    torchrun --nproc_per_node 2 launch/finetune.py --deepspeed ds_configs/zero3_fp32.json --chunks 2
    deepspeed --num_gpus 2 launch/finetune.py --deepspeed ds_configs/zero2_bf16.json \
        --bidrop_config ds_configs/bidrop.json

Every flag, output and exit code is the recipe's: `python launch/finetune.py --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bidrop_ds.recipes.finetune import main  # noqa: E402

if __name__ == "__main__":
    main()
