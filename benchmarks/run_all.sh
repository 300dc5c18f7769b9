#!/usr/bin/env bash
# All benchmarks on 2 CPU ranks (gloo), one command; writes benchmarks/results/*.json and
# benchmarks/results/latest.json and prints the Markdown tables. About 5-8 minutes on 2 cores.
#   bash benchmarks/run_all.sh            (QUICK=1 for fewer repeats; LLM=1 adds the decoder SFT row)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/tx}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=benchmarks/results
LOG=$OUT/run_all.log
mkdir -p "$OUT"
: > "$LOG"
REPEATS=${REPEATS:-7}; WARMUP=${WARMUP:-2}
if [[ "${QUICK:-0}" == 1 ]]; then REPEATS=3; WARMUP=1; fi
RUN="$TORCHRUN --standalone --nproc_per_node 2"
step() { echo "+ $*" >> "$LOG"; $RUN benchmarks/step_time.py "$@" >> "$LOG" 2>&1; }

echo "step time + communication (ZeRO-2, ZeRO-3, with the naive port)..."
step --stage 2 --naive --warmup "$WARMUP" --repeats "$REPEATS" --output_json $OUT/step_zero2.json
step --stage 3 --naive --warmup "$WARMUP" --repeats "$REPEATS" --output_json $OUT/step_zero3.json
step --stage 2 --k 4 --warmup "$WARMUP" --repeats "$REPEATS" --no_comm --output_json $OUT/step_zero2_k4.json
echo "memory (one launch per mode, ZeRO-2)..."
# fixed mmap threshold: freed large tensors leave RSS at once, so a peak is that of the live tensors (the
# default glibc heuristics moved these peaks by +-20 MiB from launch to launch)
for mode in vanilla accumulating bidrop naive; do
  MALLOC_MMAP_THRESHOLD_=65536 step --stage 2 --only $mode --warmup 1 --repeats 3 --no_comm --output_json $OUT/memory_$mode.json
done
if [[ "${SKIP_MINILM:-0}" != 1 ]]; then
  echo "step time on the offline MiniLM (ZeRO-2)..."
  step --stage 2 --model minilm --naive --warmup 1 --repeats 5 --output_json $OUT/step_minilm_zero2.json
fi
if [[ "${LLM:-0}" == 1 ]]; then
  # the decoder SFT row: a 322M-parameter config-built Llama, ZeRO-3, bf16, seq 512; ~20 minutes on 2 shared cores
  echo "decoder SFT step (Llama 322M, ZeRO-3, full and LoRA r=16)..."
  for lora in 0 16; do
    row=$([[ $lora == 0 ]] && echo full || echo lora)
    MALLOC_MMAP_THRESHOLD_=65536 step --model llama --stage 3 --bf16 --layers 20 --hidden 1024 --vocab_size 32000 \
      --seq_len 512 --micro_batch 1 --lora $lora --warmup 1 --repeats 3 --no_comm --output_json $OUT/step_sft_$row.json
  done
fi
echo "profile of one plugin step (ZeRO-2) -> $OUT/profile_zero2.txt"
$RUN benchmarks/step_time.py --stage 2 --warmup 1 --repeats 1 --no_comm --profile > $OUT/profile_zero2.txt 2>&1
echo "selection..."
SIZES=${SIZES:-1e5,1e6,1e7,1e8}
# fixed mmap threshold: large temporaries are returned to the OS on free, so RSS peaks are per call
MALLOC_MMAP_THRESHOLD_=65536 $PY benchmarks/selection.py --sizes "$SIZES" --output_json $OUT/selection_1rank.json >> "$LOG" 2>&1
MALLOC_MMAP_THRESHOLD_=65536 $RUN benchmarks/selection.py --sizes "$SIZES" --output_json $OUT/selection_2ranks.json >> "$LOG" 2>&1
echo "apply_mask math, previous vs current code (one process)..."
$PY benchmarks/apply_mask_micro.py --repeats "$REPEATS" --output_json $OUT/apply_mask_micro_cpu.json >> "$LOG" 2>&1
$PY benchmarks/summarize.py $OUT "bash benchmarks/run_all.sh" | tee $OUT/latest.md
