#!/usr/bin/env bash
# Compile every CUDA kernel source under csrc/ with nvcc alone: no GPU and no CUDA build of
# torch needed (device code includes no ATen headers). Prints ptxas register and spill counts
# per kernel and exits non-zero on any compile error.
#
# Environment: NVCC (default: nvcc on PATH), TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc_bin=${NVCC:-nvcc}
if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "nvcc_check: nvcc not found" >&2
  exit 2
fi
arch_list=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
gencode=()
for arch in ${arch_list//;/ }; do
  num=${arch%+PTX}; num=${num//./}
  gencode+=("-gencode=arch=compute_${num},code=sm_${num}")
done

mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc_check: no .cu files under csrc/"
  exit 0
fi
"$nvcc_bin" --version | tail -n 1
out_dir=$(mktemp -d)
trap 'rm -rf "$out_dir"' EXIT
status=0
for src in "${sources[@]}"; do
  log="$out_dir/$(basename "$src").log"
  if "$nvcc_bin" -std=c++20 -O3 -lineinfo --expt-relaxed-constexpr -Icsrc "${gencode[@]}" \
      -Xptxas -v -Xcompiler -Wall -c "$src" -o "$out_dir/$(basename "$src").o" >"$log" 2>&1; then
    echo "== $src: ok"
  else
    echo "== $src: COMPILE ERROR"
    cat "$log"
    status=1
    continue
  fi
  # ptxas -v prints "Compiling entry function 'NAME' for 'sm_XX'" followed by usage lines.
  awk '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); fn = substr($0, RSTART + 1, RLENGTH - 2);
                                 match($0, /sm_[0-9]+a?/); sm = substr($0, RSTART, RLENGTH) }
    /bytes spill stores/ { spill = $0; sub(/.*ptxas info *: */, "", spill) }
    /Used [0-9]+ registers/ { regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs);
                              printf "  %-6s regs=%-4s %s  %s\n", sm, regs, spill, fn }
  ' "$log" | c++filt | sed -E 's/\(([^()]|\([^()]*\))*\)$//' 
  grep -iE 'warning' "$log" || true
done

# The ATen-side CUDA launchers (csrc/cuda/*_cuda.cpp) need torch's CUDA headers, which a CPU
# wheel ships except for one generated macro file: check their syntax against a stand-in.
python_bin=${PYTHON:-}
if [ -z "$python_bin" ]; then
  if [ -x .venv/bin/python ]; then python_bin=.venv/bin/python; else python_bin=python3; fi
fi
torch_include=$("$python_bin" -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])" 2>/dev/null || true)
mapfile -t glue < <(find csrc/cuda -name '*_cuda.cpp' 2>/dev/null | sort)
if [ -z "$torch_include" ] && [ ${#glue[@]} -gt 0 ]; then
  echo "== host launcher syntax check skipped: $python_bin has no torch"
fi
if [ -n "$torch_include" ] && [ ${#glue[@]} -gt 0 ]; then
  cuda_include=""
  for dir in "${CUDA_HOME:-}/include" \
      "$(dirname "$(dirname "$(readlink -f "$(command -v "$nvcc_bin")")")")/include" \
      /usr/local/cuda/include; do
    if [ -f "$dir/cuda_runtime_api.h" ]; then cuda_include=$dir; break; fi
  done
  mkdir -p "$out_dir/inc/c10/cuda/impl"
  if [ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    echo "#pragma once" >"$out_dir/inc/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  for src in "${glue[@]}"; do
    if g++ -std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -DFACEDEBLUR_WITH_CUDA=1 \
        -Icsrc -I"$out_dir/inc" -isystem "$torch_include" \
        -isystem "$torch_include/torch/csrc/api/include" -isystem "$cuda_include" "$src"; then
      echo "== $src: host syntax ok"
    else
      echo "== $src: HOST COMPILE ERROR"
      status=1
    fi
  done
fi
exit $status
