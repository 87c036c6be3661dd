#!/usr/bin/env bash
# CI job, no GPU needed: build the extension against the CUDA build of torch, as a wheel, and
# check what was built.
#   1. a build venv (.venv-cuda) with torch==2.14.1 (CUDA 13) and torchvision==0.29.1;
#   2. the wheel, built with FACEDEBLUR_WITH_CUDA=1 for TORCH_CUDA_ARCH_LIST (default
#      "8.0;8.6;8.9;9.0") in the build folder keyed by python/torch/variant, so a rerun with no
#      change compiles nothing;
#   3. a fresh venv (.venv-cuda-wheel) with the same torch, the wheel and pytest; there,
#      outside the source tree: build_info() says CUDA with these archs, every op has a CUDA
#      kernel (tests/test_build.py), ldd resolves every library of _C, its RUNPATH holds only
#      $ORIGIN-relative folders, `facedeblur selfcheck` passes on the CPU, and the torchvision
#      comparison tests run (and must not skip).
# The torch wheels (~5.5 GB installed) come from the machine's local package index.
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST, MAX_JOBS (default 2),
#   FACEDEBLUR_CUDA_VENV (default .venv-cuda), FACEDEBLUR_CUDA_WHEEL_VENV (default
#   .venv-cuda-wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python_bin=${PYTHON:-python3}
build_venv=$(realpath -m "${FACEDEBLUR_CUDA_VENV:-.venv-cuda}")
wheel_venv=$(realpath -m "${FACEDEBLUR_CUDA_WHEEL_VENV:-.venv-cuda-wheel}")
# Pinned: an unpinned torch makes pip resolve the newest release from the index.
torch_pins=(torch==2.14.1 torchvision==0.29.1)
export FACEDEBLUR_WITH_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
wheel_dir=build/wheels-cuda
t0=$(date +%s)
step() { echo "::: cuda build: $1 ($(( $(date +%s) - t0 )) s)"; }

if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ]; then
  echo "ci_cuda_build: no nvcc on PATH and no CUDA_HOME/CUDA_PATH: a CUDA toolkit is needed" >&2
  exit 2
fi

step "build venv $build_venv"
[ -x "$build_venv/bin/python" ] || "$python_bin" -m venv "$build_venv"
bpip=("$build_venv/bin/python" -m pip --disable-pip-version-check)
"${bpip[@]}" install -q "${torch_pins[@]}" "setuptools>=64" wheel ninja
command -v cmake >/dev/null 2>&1 || "${bpip[@]}" install -q "cmake>=3.18"

step "wheel (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
# setuptools copies the package into build/lib.*/ and never deletes files there: start it
# afresh so that the wheel holds no module removed since (the CMake build folder is kept).
rm -rf build/lib.*-cpython-* build/bdist.* "$wheel_dir"
PATH="$build_venv/bin:$PATH" "${bpip[@]}" wheel -q --no-build-isolation --no-deps \
  -w "$wheel_dir" .
wheel=$(ls "$wheel_dir"/facedeblur_ext-*.whl)
echo "$wheel ($(du -h "$wheel" | cut -f1))"

step "fresh venv $wheel_venv with the wheel"
rm -rf "$wheel_venv"
"$python_bin" -m venv "$wheel_venv"
wpy="$wheel_venv/bin/python"
"$wpy" -m pip install -q --disable-pip-version-check "${torch_pins[@]}" "$wheel" pytest

step "checks outside the source tree"
# From another folder, so that the checkout's facedeblur_ext (built against the main venv's
# torch) cannot shadow the installed one.
check_dir=$(mktemp -d)
trap 'rm -rf "$check_dir"' EXIT
cd "$check_dir"
so=$("$wpy" - <<'PY'
import facedeblur_ext
import facedeblur_ext._C as native

assert "site-packages" in facedeblur_ext.__file__, facedeblur_ext.__file__
print(native.__file__)
PY
)
"$wpy" - "$TORCH_CUDA_ARCH_LIST" <<'PY'
import sys

import facedeblur_ext

info = facedeblur_ext.build_info()
print(info)
assert info["with_cuda"], "the wheel was built without CUDA"
# build_info() separates the archs with spaces (torch's syntax takes ';' or spaces).
assert info["cuda_archs"].split() == sys.argv[1].replace(";", " ").split(), info["cuda_archs"]
PY
missing=$(ldd "$so" | grep "not found" || true)
if [ -n "$missing" ]; then
  echo "ldd: unresolved libraries of $so:" >&2
  echo "$missing" >&2
  exit 1
fi
runpath=$(readelf -d "$so" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
echo "RUNPATH: ${runpath:-none}"
for entry in ${runpath//:/ }; do
  case "$entry" in
    '$ORIGIN'*) ;;
    *) echo "RUNPATH entry $entry is not relative to \$ORIGIN" >&2; exit 1 ;;
  esac
done
CUDA_VISIBLE_DEVICES="" "$wheel_venv/bin/facedeblur" selfcheck

step "tests in the wheel venv (build checks, torchvision comparison)"
# Still from $check_dir, with pythonpath lacking ".": the tests and the CLI they start import
# the installed package, not the checkout's.
log="$check_dir/pytest.log"
"$wheel_venv/bin/pytest" -q -p no:cacheprovider -c "$root/pyproject.toml" \
  --rootdir "$root" -o pythonpath=python -m "not cuda" -k "test_build or torchvision" \
  "$root/tests/test_build.py" "$root/tests/test_modulated_deform_conv.py" 2>&1 | tee "$log"
if grep -qE "[0-9]+ skipped" "$log"; then
  echo "ci_cuda_build: tests were skipped in the wheel venv (torchvision not importable?)" >&2
  exit 1
fi
step "done"
