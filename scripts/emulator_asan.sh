#!/usr/bin/env bash
# The CUDA emulator tests (pytest -m cuda_emulation) with the device code, the emulator and its
# launchers built with AddressSanitizer and UBSan: out-of-bounds accesses to tensors (global
# memory), to shared memory variables and to fiber stacks, and undefined behaviour, fail the run.
# Extra arguments go to pytest (e.g. -k "forward").
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-.venv/bin/python}
asan_runtime=$("${CXX:-g++}" -print-file-name=libasan.so)
if [ ! -e "$asan_runtime" ]; then
  echo "emulator_asan: no libasan for ${CXX:-g++}" >&2
  exit 2
fi
# The sanitizer runtime must be loaded before anything else in the Python process, and
# libstdc++ with it: ASan resolves the real __cxa_throw when it starts, and the launchers
# (csrc/cuda/*_cuda.cpp, built with it) throw the ops' errors as C++ exceptions.
cxx_runtime=$("${CXX:-g++}" -print-file-name=libstdc++.so.6)
export LD_PRELOAD="$asan_runtime:$cxx_runtime${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export FACEDEBLUR_EMULATOR_SANITIZE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# --capture=sys: a sanitizer report (written to fd 2, then the process stops) stays visible.
exec "$python_bin" -m pytest tests/test_cuda_emulation.py -m cuda_emulation -q \
  -p no:cacheprovider --capture=sys "$@"
