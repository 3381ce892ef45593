#!/usr/bin/env bash
# One run on a machine with one NVIDIA GPU, every stage time-limited:
#   1. versions; peers from wheels in .whl/ when present (diffsort, Inf-CL);
#      fetch them with `pip download --no-deps diffsort==0.2.0 inf-cl==1.2.1 -d .whl`;
#   2. the CUDA build of the extension (in place, in the background) while
#      bench/tune_gpu.py compiles the Triton candidates;
#   3. tuning: the Triton tile configurations and auto's backend per precision
#      and D, written to triton_kernels/tuned.json;
#   4. the CLIP targets grid (bench/bench_gpu_grid.py, fused vs dense);
#   5. the GPU tests (pytest -m gpu, in parallel processes: a crash fails one
#      test, not the run);
#   6. the sorting target against diffsort (bench/bench_sorting.py --gpu-check);
#   7. energy, fp32 vs bf16 (pyclloss energy), and the trainer on the card.
#
#   bash bench/gpu_check.sh
#
# Finishes within GPU_CHECK_SECONDS (default 480). The log streams to stdout;
# when OUT names a folder, the log goes there too and tuned.json and the
# results files are copied there after every stage. Exits non-zero when a stage failed (later stages still run).
# PYTHON picks the interpreter (default python3), PYCLLOSS_CUDA_ARCH the target
# (default: the GPU's compute capability, e.g. 90 on H100/H200).
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
LIMIT=${GPU_CHECK_SECONDS:-480}
LOG=$(mktemp -t gpu_check.XXXXXX)
STARTED=$(mktemp -t gpu_check_start.XXXXXX)  # results newer than this come from this run

# save: copies tuned.json and this run's results to OUT (after every stage, so
# that a run stopped from outside still leaves what it measured).
save() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "${OUT}"
  cp triton_kernels/tuned.json "${OUT}/" 2>/dev/null
  for result in bench/results/gpu-*.md bench/results/sorting-gpu-*.md /tmp/energy-gpu.md; do
    if [ -f "${result}" ] && [ "${result}" -nt "${STARTED}" ]; then cp "${result}" "${OUT}/"; fi
  done
}

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
  save
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
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv
  nvcc --version | tail -n 1
  if ls .whl/*.whl >/dev/null 2>&1; then
    "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .whl/*.whl \
      && export PYTHONPATH="/tmp/peers${PYTHONPATH:+:${PYTHONPATH}}"
  fi
  "${PYTHON}" - <<'EOF'
import sys
import torch
import triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}")
print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
for peer in ("diffsort", "inf_cl"):
    try:
        __import__(peer)
        print(f"{peer}: imports")
    except Exception as exc:
        print(f"{peer}: {type(exc).__name__}: {exc}")
EOF

  local arch
  arch=${PYCLLOSS_CUDA_ARCH:-$("${PYTHON}" -c \
    "import torch; print('%d%d' % torch.cuda.get_device_capability())")}
  local build_log=/tmp/gpu_check_build.log
  (env MAX_JOBS=12 PYCLLOSS_CUDA=1 PYCLLOSS_CUDA_ARCH="${arch}" \
    timeout 240 "${PYTHON}" setup.py build_ext --inplace >"${build_log}" 2>&1; echo $? >/tmp/build_rc) &
  local build_pid=$!

  stage tune-compile 120 "${PYTHON}" bench/tune_gpu.py --compile-only --workers 8 || failed=1
  wait "${build_pid}"
  echo "=== build: exit $(cat /tmp/build_rc) (log tail below), ${SECONDS} s elapsed"
  tail -n 5 "${build_log}"
  if [ "$(cat /tmp/build_rc)" != 0 ]; then
    failed=1
    grep -n "error" "${build_log}" | head -n 20
  fi
  "${PYTHON}" -m pyclloss info

  stage tune 150 "${PYTHON}" bench/tune_gpu.py --skip-compile --time-budget 90 || failed=1

  stage grid "$(seconds_within 30 150 230)" "${PYTHON}" bench/bench_gpu_grid.py \
    --time-budget "$(seconds_within 20 110 270)" || failed=1

  # The argument checks of the CUDA ops once crashed the process: if they still
  # do, a native backtrace says where.
  local probe=tests/test_info_nce_kernels.py::test_cuda_bad_arguments_raise
  if ! stage crash-probe 40 "${PYTHON}" -m pytest -q -p no:cacheprovider "${probe}"; then
    failed=1
    command -v cuda-gdb >/dev/null && timeout 60 cuda-gdb -batch -ex run -ex bt \
      --args "${PYTHON}" -m pytest -q -p no:cacheprovider "${probe}" 2>&1 | grep -m 30 "^#"
  fi

  # Tests in parallel processes: a crash (segfault) then fails its test only.
  stage tests "$(seconds_within 30 200 80)" env PYCLLOSS_TRITON_AUTOTUNE=0 \
    "${PYTHON}" -m pytest -m gpu -q -n 14 --maxfail=30 -p no:cacheprovider -p no:benchmark \
    -rfE tests || failed=1

  stage sorting-bench 45 "${PYTHON}" bench/bench_sorting.py --gpu-check --time-budget 25 \
    || failed=1

  local energy_out=/tmp/energy-gpu.md
  stage energy "$(seconds_within 10 50 5)" "${PYTHON}" -m pyclloss energy --device cuda \
    --loss clip --precisions fp32,bf16 --trials 5 --trial-seconds 1 --cooldown 1 \
    --idle-seconds 2 --out "${energy_out}" || failed=1

  echo
  echo "=== gpu_check: $([ "${failed}" -eq 0 ] && echo passed || echo FAILED), ${SECONDS} s"
  return "${failed}"
}

[ -n "${OUT:-}" ] && mkdir -p "${OUT}" && LOG="${OUT}/gpu_check.log"
main 2>&1 | tee "${LOG}"
status=${PIPESTATUS[0]}
save
exit "${status}"
