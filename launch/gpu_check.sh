#!/usr/bin/env bash
# GPU check of the DeepSpeed backend: ZeRO-2/3 x bf16/fp16 x 1/2 chunks against the float64 oracle,
# and an inf pass under fp16 (tests/backends/test_deepspeed_zero_gpu.py), on the device machine:
# one H100, python3 = Python 3.12 with torch 2.11+cu130 and transformers, but no deepspeed, pydantic
# or hjson, and no registry. It installs those from the wheels `make gpu-wheels` put in .whl/, prints
# the versions and the GPU, and runs the test file, which prints Markdown tables (stage, dtype,
# chunks, kept fraction vs n/N, max relative error of the fp32 master update vs the oracle, masked
# elements unchanged, skipped steps, bound). Takes a few minutes; pytest is cut off at 7.
#
# Here, first:   make gpu-wheels
# Device call:   run(command="bash launch/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The whole output also comes back as $OUT/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
log=/dev/null
if [[ -n "${OUT:-}" ]]; then log="$OUT/gpu_check.log"; fi

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
  timeout 420 python3 -m pytest tests/backends/test_deepspeed_zero_gpu.py -q -s -rs -p no:cacheprovider
} 2>&1 | tee "$log"
