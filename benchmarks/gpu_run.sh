#!/usr/bin/env bash
# One pass on a GPU machine, sized for a short slot (under 10 minutes of command time by
# default): build the CUDA extension in place, run the CUDA tests, run compute-sanitizer
# (memcheck, racecheck, initcheck) on small shapes, run the CUDA benchmarks. Each phase and
# each step in it has its own time budget; results are written as they come, so a run cut
# short still leaves what it measured.
#
# Usage, from the repository root on the GPU machine (the device tool sets $OUT itself):
#     OUT=/some/dir bash benchmarks/gpu_run.sh
# Writes 7 files to $OUT (default benchmarks/results/gpu-latest; a lent GPU machine hands back
# 8 at most):
#   run.json          command, device, driver, torch and CUDA versions, build_info(), then one
#                     entry per step (phase, rc, seconds, budget, timed_out, last log line),
#                     rewritten after every step
#   build.log, tests.log, sanitizer.log, bench.log
#   summaries.tar.gz  the benchmarks' own summary files and pytest-benchmark JSON (unpack into
#                     benchmarks/results/ to commit them), repacked after every benchmark
#   bench_table.md    scripts/bench_table.py over those summaries
# Exit status: 0 when the build and every step that ran passed; steps that cannot run (no
# GPU, no compute-sanitizer, no time left) are recorded as skipped with the reason.
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS
#   (default: the CPU count), GPU_RUN_BUDGET_S (whole run, default 540), BUILD_BUDGET_S (150),
#   TESTS_BUDGET_S (150), SANITIZER_BUDGET_S (120); the benchmarks get what is left.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-benchmarks/results/gpu-latest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 FACEDEBLUR_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$root:$root/python${PYTHONPATH:+:$PYTHONPATH}"
export GPU_RUN_BUDGET_S=${GPU_RUN_BUDGET_S:-540} BUILD_BUDGET_S=${BUILD_BUDGET_S:-150} \
  TESTS_BUDGET_S=${TESTS_BUDGET_S:-150} SANITIZER_BUDGET_S=${SANITIZER_BUDGET_S:-120}
start=$(date +%s)
deadline=$(( start + GPU_RUN_BUDGET_S ))
# Benchmark summaries are collected outside $OUT (more than 8 files) and packed into it.
summaries=$(mktemp -d)
trap 'rm -rf "$summaries"' EXIT
mkdir -p "$summaries/summaries"
export FACEDEBLUR_BENCH_OUT="$summaries/summaries" FACEDEBLUR_BENCH_RESULTS_DIR="$summaries/summaries"
failures=0

# run.json: written once here, then updated by record() after every step.
"$py" - "$OUT/run.json" "OUT=$OUT bash $0${*:+ $*}" <<'PY'
import json, os, platform, shutil, subprocess, sys

info = {"command": sys.argv[2],
        "cwd": os.getcwd(), "python": platform.python_version(), "host": platform.node(),
        "env": {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS",
                                                "GPU_RUN_BUDGET_S", "BUILD_BUDGET_S",
                                                "TESTS_BUDGET_S", "SANITIZER_BUDGET_S")},
        "steps": []}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
except ImportError as exc:
    info["torch"] = f"not importable: {exc}"
for tool, argv in {"nvidia_smi": ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                  "clocks.max.sm", "--format=csv,noheader"],
                   "nvcc": ["nvcc", "--version"],
                   "compute_sanitizer": ["compute-sanitizer", "--version"]}.items():
    if shutil.which(argv[0]):
        out = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        info[tool] = out.splitlines()[-1] if out else ""
    else:
        info[tool] = None
try:
    info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    info["git_commit"] = None  # the device tool copies the tree without .git
json.dump(info, open(sys.argv[1], "w"), indent=2)
PY

# record PHASE STEP RC SECONDS BUDGET LOG [NOTE]: append a step to run.json (atomically).
record() {
  "$py" - "$OUT/run.json" "$@" <<'PY'
import json, os, sys

path, phase, step, rc, seconds, budget, log, *note = sys.argv[1:]
data = json.load(open(path))
entry = {"phase": phase, "step": step, "rc": None if rc == "" else int(rc),
         "seconds": int(seconds), "budget": int(budget), "timed_out": rc in ("124", "137")}
if note:
    entry["note"] = note[0]
if log and os.path.exists(log):  # the step's last non-empty output line (pytest's summary)
    lines = [l for l in open(log, errors="replace").read().splitlines() if l.strip()]
    entry["last_line"] = lines[-1][-300:] if lines else ""
data["steps"].append(entry)
with open(path + ".tmp", "w") as handle:
    json.dump(data, handle, indent=2)
os.replace(path + ".tmp", path)
PY
}

# phase NAME BUDGET: later steps belong to NAME and share its budget (and the run's).
phase() {
  phase_name=$1
  phase_deadline=$(( $(date +%s) + $2 ))
  (( phase_deadline > deadline )) && phase_deadline=$deadline
  echo "::: $phase_name ($(( $(date +%s) - start )) s into the run)"
}

# skip STEP REASON: record a step that cannot run here.
skip() {
  echo "[skip] $phase_name/$1: $2"
  record "$phase_name" "$1" "" 0 0 "" "skipped: $2"
}

# step NAME LOG MAX_SECONDS CMD...: run CMD with the smallest of MAX_SECONDS, the phase's and
# the run's time left, appending its output to LOG; record it; return its status.
step() {
  local name=$1 log=$2 budget=$3 now rc t0
  shift 3
  now=$(date +%s)
  (( budget > phase_deadline - now )) && budget=$(( phase_deadline - now ))
  if (( budget < 5 )); then
    skip "$name" "no time left in the $phase_name budget"
    return 1  # not run: a build step's caller stops here
  fi
  echo "=== $phase_name/$name (budget ${budget} s): $*" >>"$log"
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" >>"$log" 2>&1
  rc=$?
  record "$phase_name" "$name" "$rc" "$(( $(date +%s) - t0 ))" "$budget" "$log"
  echo "=== $phase_name/$name rc=$rc ($(( $(date +%s) - t0 )) s)" >>"$log"
  echo "    $name: rc=$rc ($(( $(date +%s) - t0 )) s of ${budget} s)"
  (( rc == 0 )) || failures=$(( failures + 1 ))
  return $rc
}

pack_summaries() {
  tar -czf "$OUT/summaries.tar.gz.part" -C "$summaries" summaries &&
    mv "$OUT/summaries.tar.gz.part" "$OUT/summaries.tar.gz"
  "$py" scripts/bench_table.py --results "$summaries/summaries" --print \
    >"$OUT/bench_table.md" 2>>"$OUT/bench.log"
}

finish() {
  echo "::: done in $(( $(date +%s) - start )) s, $failures failed step(s); results in $OUT"
  exit $(( failures > 0 ))
}

# ---------------------------------------------------------------------------------------------
phase build "$BUILD_BUDGET_S"
if ! "$py" -c "import torch, sys; sys.exit(torch.version.cuda is None)" >/dev/null 2>&1; then
  skip compile "$py has no CUDA build of torch"
  finish
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ]; then
  skip compile "no nvcc on PATH and no CUDA_HOME"
  finish
fi
# A build that failed or could not run ends the run, as a failure.
stop_unbuilt() {
  (( failures > 0 )) || failures=1
  finish
}
step compile "$OUT/build.log" 100000 "$py" setup.py build_ext --inplace || stop_unbuilt
step build_info "$OUT/build.log" 60 "$py" -c \
  "import facedeblur_ext as f; i = f.build_info(); print(i); assert i['with_cuda'], i" ||
  stop_unbuilt

if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
  for p in tests sanitizer bench; do
    phase_name=$p
    skip all "no CUDA device visible to torch"
  done
  finish
fi

# ---------------------------------------------------------------------------------------------
phase tests "$TESTS_BUDGET_S"
step cuda_tests "$OUT/tests.log" 100000 "$py" -m pytest -v -p no:cacheprovider -m cuda \
  --durations=15 tests

# ---------------------------------------------------------------------------------------------
# Small shapes: `facedeblur selfcheck --device cuda` runs every op family forward and backward
# on inputs of a few hundred elements; then, with the phase's time left, the kernel test files'
# small CUDA cases under memcheck. The caching allocator would hide out-of-bounds accesses
# inside its blocks: it is off.
phase sanitizer "$SANITIZER_BUDGET_S"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck initcheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "selfcheck_$tool" "$OUT/sanitizer.log" 40 \
      compute-sanitizer --tool "$tool" --error-exitcode 7 --print-limit 20 \
      "$py" -m facedeblur_ext selfcheck --device cuda
  done
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step kernel_tests_memcheck "$OUT/sanitizer.log" 100000 \
    compute-sanitizer --tool memcheck --error-exitcode 7 --print-limit 20 \
    "$py" -m pytest -q -p no:cacheprovider -m cuda \
    -k "not large and not compile and not opcheck and not gradcheck" \
    tests/test_modulated_deform_conv.py tests/test_separable_norm.py tests/test_blur.py
else
  skip all "compute-sanitizer not on PATH"
fi

# ---------------------------------------------------------------------------------------------
# The fused ops first (they are what no GPU has measured yet), then the models and metrics.
phase bench $(( deadline - $(date +%s) ))
pyb=("$py" -m pytest -q -p no:cacheprovider)
for file in bench_modulated_deform_conv bench_blur bench_cfmd bench_snadnet; do
  FACEDEBLUR_BENCH_DEVICES=cuda step "$file" "$OUT/bench.log" 150 "${pyb[@]}" \
    "benchmarks/$file.py" -k cuda --benchmark-json "$summaries/summaries/pytest_$file.json"
  pack_summaries
  if [ "$file" = bench_modulated_deform_conv ]; then
    for dtype in float32 float16; do
      suffix=$([ "$dtype" = float32 ] && echo "" || echo "_fp16")
      step "bench_separable_norm_$dtype" "$OUT/bench.log" 90 "$py" \
        benchmarks/bench_separable_norm.py --device cuda --dtype "$dtype" \
        --out "$summaries/summaries/cuda_separable_norm$suffix.json"
      pack_summaries
    done
  fi
done
step bench_metrics "$OUT/bench.log" 90 "$py" benchmarks/bench_metrics.py --device cuda \
  --output "$summaries/summaries/cuda_metrics.json"
pack_summaries
finish
