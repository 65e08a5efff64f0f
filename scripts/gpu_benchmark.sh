#!/usr/bin/env bash
# The prepared GPU suite (experiments/benchmark/suite.py), about 8 minutes on one H100 / H200: RetinaNet
# R50-FPN 1x at 800x1344, batch 16, bf16 -- eager, CUDA graph, compiled (time-capped), fused focal loss and
# box buckets on/off, beside torchvision's RetinaNet, train and inference, and the top kernels of the fastest
# step. Random weights and synthetic batches: no data, no network. Writes OUT/gpu_suite.json, OUT/gpu_suite.md
# and OUT/gpu_suite.log.
#   bash scripts/gpu_benchmark.sh OUT              # on the GPU machine
#   bash scripts/gpu_benchmark.sh OUT --dry-run    # anywhere: the same rows, tiny, on the CPU (plumbing only)
# More experiments.benchmark flags may follow (--compile-cap=SECONDS, --budget=SECONDS). PYTHON picks the
# interpreter (default python3). Packages the machine lacks (ml_collections, optree) are installed from the
# wheels in .whl/ when that folder is there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_benchmark.sh OUT [--dry-run] [experiments.benchmark flags]}
shift
python=${PYTHON:-python3}
if ! "$python" -c "import ml_collections, optree" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_benchmark.sh: $python lacks ml_collections or optree and there is no .whl/ folder with their wheels" >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/retina_fn_site .whl/*.whl
  export PYTHONPATH=/tmp/retina_fn_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
"$python" -m experiments.benchmark --suite=gpu --out="$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
