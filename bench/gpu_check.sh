#!/usr/bin/env bash
# One run on a machine with one NVIDIA GPU: versions, the CUDA build of the
# extension (in place), the GPU tests, the sorting-network target
# (bench/bench_sorting.py --gpu-check, which writes
# bench/results/sorting-gpu-<card>.md), then the GPU benchmark
# (bench/bench_gpu.py, which writes bench/results/gpu-<card>.md).
#
#   bash bench/gpu_check.sh
#
# Finishes within GPU_CHECK_SECONDS (default 470) by giving each stage a time
# limit and the benchmark what is left. The log streams to stdout; when OUT
# names a folder, the log and the results files are copied there. Exits non-zero
# when the build, the tests or the benchmark failed (later stages still run).
# PYTHON picks the interpreter (default python3), PYCLLOSS_CUDA_ARCH the target
# (default: the GPU's compute capability, e.g. 90 on H100/H200).
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
LIMIT=${GPU_CHECK_SECONDS:-470}
LOG=$(mktemp -t gpu_check.XXXXXX)
STARTED=$(mktemp -t gpu_check_start.XXXXXX)  # results newer than this come from this run

# stage NAME SECONDS COMMAND...: runs COMMAND with a time limit, reports its exit.
stage() {
  local name=$1 seconds=$2
  shift 2
  echo
  echo "=== ${name} (limit ${seconds} s, ${SECONDS} s elapsed)"
  timeout --signal=INT --kill-after=10 "${seconds}" "$@"
  local rc=$?
  [ "${rc}" -eq 124 ] && echo "=== ${name}: stopped at its time limit"
  echo "=== ${name}: exit ${rc}, ${SECONDS} s elapsed"
  return "${rc}"
}

# seconds_within LOW HIGH RESERVE: the time left after RESERVE, clamped to [LOW, HIGH].
seconds_within() {
  local s=$((LIMIT - SECONDS - $3))
  [ "${s}" -lt "$1" ] && s=$1
  [ "${s}" -gt "$2" ] && s=$2
  echo "${s}"
}

main() {
  local failed=0
  echo "# pyclloss GPU check, $(date -Is), $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi
  nvcc --version | tail -n 2
  "${PYTHON}" - <<'EOF'
import sys
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton_version}")
print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
EOF

  local arch
  arch=${PYCLLOSS_CUDA_ARCH:-$("${PYTHON}" -c \
    "import torch; print('%d%d' % torch.cuda.get_device_capability())")}
  if ! stage build 240 env MAX_JOBS=16 PYCLLOSS_CUDA=1 PYCLLOSS_CUDA_ARCH="${arch}" \
      "${PYTHON}" setup.py build_ext --inplace; then
    failed=1
    echo "CUDA build failed: building without CUDA so that the other GPU checks still run"
    stage build-without-cuda 120 env MAX_JOBS=16 PYCLLOSS_CUDA=0 \
      "${PYTHON}" setup.py build_ext --inplace
  fi
  "${PYTHON}" -m pyclloss info

  # One Triton tile per kernel in the tests (autotuning every odd size would
  # spend the stage compiling); the benchmark stages autotune.
  stage tests "$(seconds_within 30 150 210)" env PYCLLOSS_TRITON_AUTOTUNE=0 \
    "${PYTHON}" -m pytest -m gpu -q --maxfail=10 -p no:cacheprovider tests || failed=1

  # Starts no new case after 45 s; the stage limit covers the case in flight.
  stage sorting-bench 60 "${PYTHON}" bench/bench_sorting.py --gpu-check --time-budget 45 \
    || failed=1

  # The benchmark's timings stop at its budget; accuracy rows and the report follow.
  stage bench "$(seconds_within 30 600 5)" \
    "${PYTHON}" bench/bench_gpu.py --time-budget "$(seconds_within 10 200 60)" || failed=1

  echo
  echo "=== gpu_check: $([ "${failed}" -eq 0 ] && echo passed || echo FAILED), ${SECONDS} s"
  return "${failed}"
}

main 2>&1 | tee "${LOG}"
status=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  mkdir -p "${OUT}"
  cp "${LOG}" "${OUT}/gpu_check.log"
  for result in bench/results/gpu-*.md bench/results/sorting-gpu-*.md; do
    if [ "${result}" -nt "${STARTED}" ]; then cp "${result}" "${OUT}/"; fi
  done
fi
exit "${status}"
