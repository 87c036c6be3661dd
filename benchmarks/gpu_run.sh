#!/usr/bin/env bash
# One pass on a GPU machine: build the CUDA extension, run the CUDA tests, run
# compute-sanitizer (memcheck, racecheck) over the kernel tests, run the benchmarks.
# Everything lands in $OUT (default benchmarks/results/gpu-latest) as 8 files (the most a lent
# GPU machine hands back):
#   env.json, build.log, cuda_tests.log, sanitizer.log, bench_cuda.json (pytest-benchmark),
#   bench.log, summaries.tar.gz (the benchmarks' own summary files: cuda_blur.json,
#   cfmd_cuda.json, snadnet_cuda.json, cuda_modulated_deform_conv.json,
#   cuda_separable_norm*.json, cuda_metrics.json; unpack into benchmarks/results/ to commit
#   them) and bench_table.md (scripts/bench_table.py over all of them).
# Usage (repo root, on the GPU machine): OUT=/some/dir bash benchmarks/gpu_run.sh
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0), PYTHON (default python3),
#   BENCH_FILTER (pytest -k expression for the benchmarks, default "cuda").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-latest}
mkdir -p "$OUT"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 FACEDEBLUR_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
# The benchmarks' summary files go to $OUT/summaries (two spellings: bench_blur/cfmd/snadnet
# read FACEDEBLUR_BENCH_OUT, bench_modulated_deform_conv FACEDEBLUR_BENCH_RESULTS_DIR).
SUMMARIES="$OUT/summaries"
mkdir -p "$SUMMARIES"
export FACEDEBLUR_BENCH_OUT="$SUMMARIES" FACEDEBLUR_BENCH_RESULTS_DIR="$SUMMARIES"
kernel_tests=(tests/test_modulated_deform_conv.py tests/test_separable_norm.py tests/test_blur.py)
existing_kernel_tests=()
for t in "${kernel_tests[@]}"; do [ -f "$t" ] && existing_kernel_tests+=("$t"); done

"$py" - >"$OUT/env.json" <<'PY'
import json, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
print(json.dumps(info, indent=2))
PY

start=$(date +%s)
echo "::: build" | tee "$OUT/build.log"
MAX_JOBS=${MAX_JOBS:-16} "$py" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
build_rc=$?
"$py" -c "import facedeblur_ext as f; print(f.build_info())" >>"$OUT/build.log" 2>&1
bash scripts/nvcc_check.sh >>"$OUT/build.log" 2>&1
echo "build rc=$build_rc ($(( $(date +%s) - start )) s)" | tee -a "$OUT/build.log"
[ $build_rc -eq 0 ] || exit $build_rc

echo "::: CUDA tests"
"$py" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/cuda_tests.log" | tail -n 5

echo "::: compute-sanitizer"
: >"$OUT/sanitizer.log"
if command -v compute-sanitizer >/dev/null 2>&1 && [ ${#existing_kernel_tests[@]} -gt 0 ]; then
  for tool in memcheck racecheck; do
    echo "=== $tool" >>"$OUT/sanitizer.log"
    # The caching allocator hides out-of-bounds accesses inside its blocks: turn it off.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 900 compute-sanitizer --tool "$tool" \
      --error-exitcode 7 --print-limit 20 "$py" -m pytest -q -p no:cacheprovider -x \
      -m cuda -k "not large and not compile and not opcheck" "${existing_kernel_tests[@]}" \
      >>"$OUT/sanitizer.log" 2>&1
    echo "=== $tool rc=$?" >>"$OUT/sanitizer.log"
  done
fi
grep "=== " "$OUT/sanitizer.log"

echo "::: benchmarks"
"$py" -m pytest -q -p no:cacheprovider benchmarks -k "${BENCH_FILTER:-cuda}" \
  --benchmark-json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.log" | tail -n 30
# bench_separable_norm and bench_metrics write their summaries only in script mode.
"$py" benchmarks/bench_metrics.py --device cuda --output "$SUMMARIES/cuda_metrics.json" \
  >>"$OUT/bench.log" 2>&1
for dtype in float32 float16; do
  suffix=$([ "$dtype" = float32 ] && echo "" || echo "_fp16")
  "$py" benchmarks/bench_separable_norm.py --device cuda --dtype "$dtype" \
    --out "$SUMMARIES/cuda_separable_norm$suffix.json" >>"$OUT/bench.log" 2>&1
done
"$py" scripts/bench_table.py --results "$OUT" --print >"$OUT/bench_table.md" 2>>"$OUT/bench.log"
tar -czf "$OUT/summaries.tar.gz" -C "$OUT" summaries && rm -rf "$SUMMARIES"
echo "total $(( $(date +%s) - start )) s"
