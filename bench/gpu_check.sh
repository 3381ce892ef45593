#!/usr/bin/env bash
# One check on a machine with one NVIDIA GPU, CUDA, PyTorch and Triton:
# build the extension with the CUDA kernels, run every `gpu`-marked test,
# then print the GPU benchmark table (bench/results/gpu-<card>.md).
# Logs and results are copied to $OUT when that variable is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOGS=${OUT:-bench/results}
mkdir -p "$LOGS"
status=0

nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (CUDA, sm_90)"
if ! MAX_JOBS=16 PYCLLOSS_CUDA=1 PYCLLOSS_CUDA_ARCH=90 python3 setup.py build_ext --inplace \
    > "$LOGS/gpu-build.log" 2>&1; then
  grep -E "error|Error" "$LOGS/gpu-build.log" | head -30
  echo "CUDA build FAILED; rebuilding without CUDA so the Triton checks still run"
  status=1
  PYCLLOSS_CUDA=0 python3 setup.py build_ext --inplace > "$LOGS/cpu-build.log" 2>&1 || exit 1
fi
python3 -m pyclloss info

echo "== gpu tests"
timeout 240 python3 -m pytest -m gpu -q -x tests -p no:cacheprovider 2>&1 | tee "$LOGS/gpu-tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== gpu benchmark"
timeout 200 python3 bench/bench_gpu.py --time-budget 150 2>&1 | tee "$LOGS/gpu-bench.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cp bench/results/gpu-*.md "$LOGS"/ 2>/dev/null || true
exit $status
