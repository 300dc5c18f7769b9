#!/usr/bin/env bash
# GPU check of the DeepSpeed backend: ZeRO-2/3 x bf16/fp16 x 1/2 chunks against the float64 oracle,
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
#      be slower on GPU).
# and ends with each figure next to its goal. JSON results go to $OUT (or /tmp/gpu_bench).
# `bash launch/gpu_check.sh all` runs both (longer than one 600 s device call: use two calls).
#
# Here, first:   make gpu-wheels
# Device calls:  run(command="bash launch/gpu_check.sh", carry=[".whl"], timeout_s=540)
#                run(command="bash launch/gpu_check.sh bench", carry=[".whl"], timeout_s=420)
# The whole output also comes back as $OUT/gpu_check.log ($OUT/gpu_bench.log for bench).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-tests}
case "$MODE" in tests|bench|all) ;; *) echo "usage: bash launch/gpu_check.sh [tests|bench|all]" >&2; exit 2;; esac
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
log=/dev/null
if [[ -n "${OUT:-}" ]]; then log="$OUT/gpu_check.log"; [[ "$MODE" == bench ]] && log="$OUT/gpu_bench.log"; fi
RESULTS=${OUT:-/tmp/gpu_bench}
mkdir -p "$RESULTS"
TORCHRUN="python3 -m torch.distributed.run --standalone --nproc_per_node 1"

{
  if ! python3 -c "import deepspeed" 2>/dev/null; then
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
  python3 - <<'EOF'
import sys, torch, deepspeed, pydantic, transformers
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, pydantic {pydantic.__version__}")
EOF
  nvidia-smi -L
  if [[ "$MODE" != bench ]]; then
    timeout 420 python3 -m pytest tests/backends/test_deepspeed_zero_gpu.py -q -s -rs -p no:cacheprovider
  fi
  if [[ "$MODE" != tests ]]; then
    status=0
    echo "== step time: BERT 24x1024 bf16, ZeRO-2, 1 GPU, micro batch 32 x 128, k = 2, p = 0.3"
    timeout 240 $TORCHRUN benchmarks/step_time.py --stage 2 --bf16 --layers 24 --hidden 1024 --vocab_size 30522 \
      --micro_batch 32 --seq_len 128 --warmup 3 --repeats 9 --naive --output_json "$RESULTS/step_gpu_zero2_bf16.json" || status=$?
    echo "== exact selection vs torch.kthvalue (one GPU)"
    timeout 120 $TORCHRUN benchmarks/selection.py --device cuda --sizes 1e6,1e7,1e8 --repeats 5 \
      --output_json "$RESULTS/selection_gpu.json" || status=$?
    echo "== apply_mask math, previous vs current code, BERT 24x1024 statistics (one partition)"
    timeout 150 python3 benchmarks/apply_mask_micro.py --device cuda --models 24x1024 --vocab_size 30522 --ranks 1 \
      --repeats 5 --output_json "$RESULTS/apply_mask_gpu.json" || status=$?
    python3 - "$RESULTS" <<'EOF'
import json, os, sys
d = sys.argv[1]
def load(name):
    path = os.path.join(d, name)
    return json.load(open(path)) if os.path.exists(path) else None
print("\n== GPU figures next to their goals")
step = load("step_gpu_zero2_bf16.json")
if step:
    print(f"step time Bi-Drop / (k x vanilla), BERT {step['params'] / 1e6:.0f}M params {step['dtype']} "
          f"ZeRO-{step['stage']} {step['ranks']} GPU: {step['step_time_ratio']:.3f} "
          f"(goal {step['step_time_goal']}: {step['goal_met']}); vanilla {step['vanilla_step_s'] * 1e3:.1f} ms, "
          f"Bi-Drop {step['bidrop_step_s'] * 1e3:.1f} ms, naive / (k x vanilla) {step.get('naive_step_time_ratio', float('nan')):.3f}")
    print(f"plugin buffers {step['plugin_bytes_per_rank'] / 2**20:.1f} MiB (bound 8 x owned = "
          f"{step['bound_bytes_per_rank'] / 2**20:.1f} MiB + 1 MiB); extra comm per step: "
          f"{step.get('extra_comm_calls_per_step')} all-reduces, largest {step.get('extra_comm_max_call_bytes')} B "
          f"(goal <= 4 of <= 8 KiB); peak GPU memory {step.get('peak_gpu_mib', float('nan')):.0f} MiB")
else:
    print("step time: no result (see above)")
sel = load("selection_gpu.json")
for r in (sel or {}).get("rows", []):
    print(f"selection P = {r['P_per_rank']:.0e}: exact {r['exact_s'] * 1e3:.2f} ms vs kthvalue "
          f"{r['gather_kthvalue_s'] * 1e3:.2f} ms (x{r['speedup']:.2f}; goal faster from P = 1e7: {r['goal_faster']})")
micro = load("apply_mask_gpu.json")
for r in (micro or {}).get("rows", []):
    print(f"apply_mask math, {r['elements']:,} elements: previous {r['old_total_ms']:.2f} ms -> current "
          f"{r['new_total_ms']:.2f} ms (x{r['total_speedup']:.2f}; select x{r['select_speedup']:.2f}, "
          f"scores x{r['scores_speedup']:.2f}, mask x{r['mask_speedup']:.2f}; goal: not slower, "
          f"{'met' if r['total_speedup'] >= 1 else 'missed'}; same threshold and update: {r['identical']})")
EOF
    exit $status
  fi
} 2>&1 | tee "$log"
