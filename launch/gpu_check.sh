#!/usr/bin/env bash
# GPU check of the DeepSpeed backend: ZeRO-2/3 x bf16/fp16 (and ZeRO-2 fp32) x 1/2 chunks against the float64 oracle,
# and an inf pass under fp16 (tests/backends/test_deepspeed_zero_gpu.py), on the device machine:
# one H100, python3 = Python 3.12 with torch 2.11+cu130 and transformers, but no deepspeed, pydantic
# or hjson, and no registry. It installs those from the wheels `make gpu-wheels` put in .whl/, prints
# the versions and the GPU, and runs the test file, which prints Markdown tables (stage, dtype,
# chunks, kept fraction vs n/N, max relative error of the fp32 master update vs the oracle, masked
# elements unchanged, skipped steps, bound). Takes a few minutes; pytest is cut off at 7.
#
# `bash launch/gpu_check.sh bench` runs the GPU variant of the benchmarks instead (about 3-5
# minutes, each part under its own timeout), BERT-large's shape (24 layers x 1024 hidden, 335M
# parameters) in bf16 on DeepSpeed ZeRO-2, one GPU (nccl):
#   1. benchmarks/step_time.py: vanilla, Bi-Drop and the naive port, interleaved (vocabulary 30522,
#      micro batch 32 x 128 tokens, k = 2, p = 0.3); goal Bi-Drop / (k x vanilla) <= 1.03;
#   2. benchmarks/selection.py --device cuda: exact selection vs torch.kthvalue at P = 1e6, 1e7,
#      1e8 (one rank: nothing to gather); goal: exact faster from P = 1e7;
#   3. benchmarks/apply_mask_micro.py --device cuda: the apply_mask math (scores, selection, mask)
#      of the previous code vs the current one on BERT-large's real statistics (current must not
#      be slower on GPU);
#   4. the decoder SFT row, benchmarks/step_time.py --model llama: a config-built Llama causal LM of
#      322M parameters (20 layers x 1024 hidden, vocabulary 32000) in bf16 on ZeRO-3, micro batch
#      8 x 512 tokens, one rank per GPU, full fine-tuning and peft LoRA r = 16 on q/v (LoRA needs
#      peft: from .whl/ if the image lacks it, else that row is skipped); goals Bi-Drop / (k x
#      vanilla) <= 1.03, and a Bi-Drop step's peak GPU memory over a vanilla step's <= 8 MiB beyond
#      the plugin's own buffers (4 bytes per eligible element owned: with LoRA, per LoRA element).
# and ends with each figure next to its goal. JSON results go to $OUT (or /tmp/gpu_bench).
# `bash launch/gpu_check.sh all` runs both (longer than one 600 s device call: use two calls).
# `bash launch/gpu_check.sh bench-dry` runs the same three bench commands and the summary
# (benchmarks/gpu_summary.py) here, on the CPU at a tiny size (2 x 64 BERT, P up to 1e5): a check of
# the script's plumbing, not a measurement (tests/launch/test_gpu_check.py runs it in CI).
#
# Here, first:   make gpu-wheels
# Device calls:  run(command="bash launch/gpu_check.sh", carry=[".whl"], timeout_s=540)
#                run(command="bash launch/gpu_check.sh bench", carry=[".whl"], timeout_s=420)
# The whole output also comes back as $OUT/gpu_check.log ($OUT/gpu_bench.log for bench).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-tests}
case "$MODE" in tests|bench|bench-dry|all) ;; *) echo "usage: bash launch/gpu_check.sh [tests|bench|bench-dry|all]" >&2; exit 2;; esac
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [[ "$MODE" == bench-dry ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  DEVICE=cpu PYTHON=${PYTHON:-python}
  STEP_SHAPE="--layers 2 --hidden 64 --vocab_size 512 --micro_batch 4 --seq_len 16 --warmup 1 --repeats 2"
  SELECTION_SIZES=1e4,1e5 MASK_SHAPE=2x64 MASK_VOCAB=512 REPEATS=2
  SFT_SHAPE="--layers 2 --hidden 64 --vocab_size 256 --micro_batch 2 --seq_len 32 --warmup 1 --repeats 1"
  SFT_ROWS="full lora"
else
  export DS_ACCELERATOR=cuda
  DEVICE=cuda PYTHON=python3
  STEP_SHAPE="--layers 24 --hidden 1024 --vocab_size 30522 --micro_batch 32 --seq_len 128 --warmup 3 --repeats 9"
  SELECTION_SIZES=1e6,1e7,1e8 MASK_SHAPE=24x1024 MASK_VOCAB=30522 REPEATS=5
  SFT_SHAPE="--layers 20 --hidden 1024 --vocab_size 32000 --micro_batch 8 --seq_len 512 --warmup 2 --repeats 5"
  SFT_ROWS="full lora"
fi
log=/dev/null
if [[ -n "${OUT:-}" ]]; then log="$OUT/gpu_check.log"; [[ "$MODE" == bench* ]] && log="$OUT/gpu_bench.log"; fi
RESULTS=${OUT:-/tmp/gpu_bench}
mkdir -p "$RESULTS"
TORCHRUN="$PYTHON -m torch.distributed.run --standalone --nproc_per_node 1"

{
  if [[ "$MODE" != bench-dry ]] && ! python3 -c "import deepspeed" 2>/dev/null; then
    # The resolver takes deepspeed and only the needs the image lacks (or has too old) from .whl/.
    if ! python3 -m pip install -q --disable-pip-version-check --no-index --no-cache-dir --find-links .whl \
        deepspeed==0.19.8; then
      echo "pip could not install into python3's environment; the device README's way: .whl/* into /tmp/site"
      python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site
    fi
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bidrop_ds and tests/ from this tree, not installed
  [[ "$MODE" == bench-dry ]] || python3 - <<'EOF'
import sys, torch, deepspeed, pydantic, transformers
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, pydantic {pydantic.__version__}")
EOF
  [[ "$MODE" == bench-dry ]] || nvidia-smi -L
  if [[ "$MODE" == tests || "$MODE" == all ]]; then
    timeout 420 python3 -m pytest tests/backends/test_deepspeed_zero_gpu.py -q -s -rs -p no:cacheprovider
  fi
  if [[ "$MODE" != tests ]]; then
    status=0
    echo "== step time: BERT ($STEP_SHAPE) bf16, ZeRO-2, 1 $DEVICE rank, k = 2, p = 0.3"
    timeout 240 $TORCHRUN benchmarks/step_time.py --device $DEVICE --stage 2 --bf16 $STEP_SHAPE --naive \
      --output_json "$RESULTS/step_zero2_bf16.json" || status=$?
    echo "== exact selection vs torch.kthvalue (one $DEVICE rank)"
    timeout 120 $TORCHRUN benchmarks/selection.py --device $DEVICE --sizes $SELECTION_SIZES --repeats $REPEATS \
      --output_json "$RESULTS/selection.json" || status=$?
    echo "== apply_mask math, previous vs current code, BERT $MASK_SHAPE statistics (one partition)"
    timeout 150 $PYTHON benchmarks/apply_mask_micro.py --device $DEVICE --models $MASK_SHAPE --vocab_size $MASK_VOCAB \
      --ranks 1 --repeats $REPEATS --output_json "$RESULTS/apply_mask.json" || status=$?
    if [[ "$MODE" != bench-dry ]] && ! python3 -c "import peft" 2>/dev/null; then
      python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links .whl peft 2>/dev/null \
        || echo "no peft wheel in .whl/: the LoRA row is skipped"
    fi
    for row in $SFT_ROWS; do
      lora=0; [[ "$row" == lora ]] && lora=16
      if [[ $lora != 0 ]] && ! $PYTHON -c "import peft" 2>/dev/null; then continue; fi
      echo "== decoder SFT step ($row): Llama ($SFT_SHAPE) bf16, ZeRO-3, 1 $DEVICE rank, k = 2, p = 0.3"
      timeout 150 $TORCHRUN benchmarks/step_time.py --device $DEVICE --model llama --stage 3 --bf16 --lora $lora \
        $SFT_SHAPE --no_comm --output_json "$RESULTS/step_sft_$row.json" || status=$?
    done
    $PYTHON benchmarks/gpu_summary.py "$RESULTS"
    exit $status
  fi
} 2>&1 | tee "$log"
