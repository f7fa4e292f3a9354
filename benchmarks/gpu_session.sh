#!/usr/bin/env bash
# Every GPU check and figure in one script, for a machine with an NVIDIA GPU, run from the
# repository root. Each step writes under $OUT (default: ./gpu-out) as soon as it ends, so a
# time limit that stops a later step keeps what the earlier ones measured. Shortest first.
#
#   WORKBENCH_DATA_DIR=/path/holding/tinyshakespeare.txt OUT=/tmp/out bash benchmarks/gpu_session.sh
#
# 1. pytest -m gpu                        -> $OUT/pytest_gpu.txt
# 2. bench_gpu.py --full (rung 7)         -> $OUT/gpu.json
# 3. bench_gpu_ablation.py (135 runs,
#    packed, 3 packs per GPU, then alone) -> $OUT/gpu_ablation.json
# Copy the JSON files into benchmarks/ and their figures into benchmarks/RESULTS.md.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
: "${WORKBENCH_DATA_DIR:?set WORKBENCH_DATA_DIR to a folder holding tinyshakespeare.txt}"
export WORKBENCH_DATA_DIR

step() {  # name, then the command; its time and exit code go to $OUT/steps.txt
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt" || exit 1
python -c "import workbench" 2>/dev/null || pip install --no-deps -q -e . || exit 1
step pytest-gpu bash -c "python -m pytest -m gpu -q -p no:cacheprovider > '$OUT/pytest_gpu.txt' 2>&1"
step bench-gpu python benchmarks/bench_gpu.py --full --out "$OUT/gpu.json"
step gpu-ablation python benchmarks/bench_gpu_ablation.py --extra=--jobs-per-gpu=3 \
    --out "$OUT/gpu_ablation.json"
