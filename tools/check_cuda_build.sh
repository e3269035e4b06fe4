#!/usr/bin/env bash
# CI build check of the CUDA kernels: configure a separate build folder with -DCFGSWITCH_CUDA=ON,
# build it with nvcc, and check that the library exports its C entry points. Nothing runs the
# kernels here (no GPU); tests/test_kernels_cuda.py does that on a GPU machine.
#
# Usage: tools/check_cuda_build.sh [BUILD_DIR]      (default: build/cuda-check)
# Environment: PYTHON (default: .venv/bin/python, else python3), NVCC (default: found on PATH or
#              under /usr/local/cuda*/bin), CUDA_ARCHS (default: 80;90).
# Exit status: 0 when the build passes or when no nvcc exists (a message says it was skipped),
#              non-zero when configuring or building fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build/cuda-check}"

find_nvcc() {
  if [[ -n "${NVCC:-}" && -x "${NVCC}" ]]; then
    echo "$NVCC"
    return 0
  fi
  if command -v nvcc >/dev/null 2>&1; then
    command -v nvcc
    return 0
  fi
  local candidate
  for candidate in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc /opt/cuda/bin/nvcc; do
    if [[ -x "$candidate" ]]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if ! NVCC_PATH="$(find_nvcc)"; then
  echo "check_cuda_build: SKIPPED: no nvcc found (PATH, /usr/local/cuda*/bin); the CUDA kernels were not compiled"
  exit 0
fi

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3)"
fi
PYBIND11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')"

echo "check_cuda_build: $("$NVCC_PATH" --version | tail -n 2 | head -n 1)"
echo "check_cuda_build: configuring $BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCFGSWITCH_CUDA=ON \
  -DCMAKE_CUDA_COMPILER="$NVCC_PATH" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-80;90}" \
  -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$PY" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$BUILD" >"$BUILD.configure.log" 2>&1 || {
  cat "$BUILD.configure.log"
  echo "check_cuda_build: FAILED: cmake configure (log above)"
  exit 1
}
echo "check_cuda_build: building"
cmake --build "$BUILD" -j "${JOBS:-2}" || {
  echo "check_cuda_build: FAILED: build"
  exit 1
}

LIB="$BUILD/libcfgswitch_cuda.so"
if [[ ! -f "$LIB" ]]; then
  echo "check_cuda_build: FAILED: $LIB was not produced"
  exit 1
fi
for symbol in cfgswitch_guide_and_step_cuda cfgswitch_guide_and_step_workspace_bytes cfgswitch_cuda_error_string; do
  if ! nm -D --defined-only "$LIB" | grep -q " T $symbol\$"; then
    echo "check_cuda_build: FAILED: $LIB does not export $symbol"
    exit 1
  fi
done
echo "check_cuda_build: OK: $LIB exports the guide_and_step C entry points"
