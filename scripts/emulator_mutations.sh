#!/usr/bin/env bash
# Mutation check of the CUDA emulator tests: each mutation below (a needed __syncthreads()
# removed, a shared-memory buffer shrunk by one element, a bound off by one) is applied to a
# copy of csrc/, the emulator tests of that op family run on the copy
# (FACEDEBLUR_EMULATOR_CSRC), and the mutation must make them fail. Prints, per mutation,
# the first failing test, or SURVIVED; exits 1 if any mutation survived.
#
# Usage: scripts/emulator_mutations.sh [NAME ...]   (default: every mutation)
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name | file under csrc | tests (-k) | python expression: the source text to replace | the replacement
mutations=(
  "snorm_block_merge_barrier|cuda/separable_norm_kernels.cu|separable|'merge(m, smem[j].w, smem[j].mean, smem[j].m2);\n    }\n    __syncthreads();\n'|'merge(m, smem[j].w, smem[j].mean, smem[j].m2);\n    }\n'"
  "snorm_apply_barrier|cuda/separable_norm_kernels.cu|separable|'  __syncthreads();\n  if (!t.active) return;'|'  if (!t.active) return;'"
  "snorm_stats_smem_short|cuda/separable_norm_kernels.cu|separable|'FD_SHARED_ARRAY(Moments<Acc>, smem, kThreads);'|'FD_SHARED_ARRAY(Moments<Acc>, smem, kThreads - 1);'"
  "snorm_dmask_smem_short|cuda/separable_norm_kernels.cu|separable|'kWantDmask ? kWarps * kMaxR * kWarp : 1'|'kWantDmask ? kWarps * kMaxR * kWarp - 1 : 1'"
  "blur_plane_barrier|cuda/blur_kernels.cu|blur|'    __syncthreads();  // the next plane overwrites the tile\n'|''"
  "blur_tile_load_barrier|cuda/blur_kernels.cu|blur|'lut, crf, gamma);\n  }\n  __syncthreads();\n}'|'lut, crf, gamma);\n  }\n}'"
  "blur_reduce_smem_short|cuda/blur_kernels.cu|blur|'FD_SHARED_ARRAY(acc_t, partial, kReduceThreads);'|'FD_SHARED_ARRAY(acc_t, partial, kReduceThreads - 1);'"
  "blur_tile_dynamic_smem_short|cuda/blur_kernels.cu|blur|'(lut ? 256 : 0)) * elem;'|'(lut ? 256 : 0) - 1) * elem;'"
  "dcn_slice_sum_barrier|cuda/modulated_deform_conv_kernels.cu|deform|'= a[j];\n      __syncthreads();\n'|'= a[j];\n'"
  "dcn_slice_smem_short|cuda/modulated_deform_conv_kernels.cu|deform|'4 * slices * kWarp * sizeof(acc_t)'|'(4 * slices * kWarp - 1) * sizeof(acc_t)'"
  "dcn_pixel_bound|cuda/modulated_deform_conv_kernels.cu|deform|'if (t >= tile.pixels) return;  // no barrier'|'if (t > tile.pixels) return;  // no barrier'"
)

selected=("$@")
survived=0
for entry in "${mutations[@]}"; do
  IFS='|' read -r name file tests old new <<<"$entry"
  if [ ${#selected[@]} -gt 0 ] && [[ ! " ${selected[*]} " =~ " $name " ]]; then continue; fi
  rm -rf "$work/csrc"
  cp -r csrc "$work/csrc"
  "$python_bin" - "$work/csrc/$file" "$old" "$new" <<'PY'
import ast, sys
path, old, new = sys.argv[1], ast.literal_eval(sys.argv[2]), ast.literal_eval(sys.argv[3])
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"mutation does not apply: {old!r} occurs {text.count(old)} times in {path}")
open(path, "w").write(text.replace(old, new))
PY
  log="$work/$name.log"
  if FACEDEBLUR_EMULATOR_CSRC="$work/csrc" OMP_NUM_THREADS=1 "$python_bin" -m pytest \
      tests/test_cuda_emulation.py -m cuda_emulation -k "$tests" -x -q -p no:cacheprovider \
      >"$log" 2>&1; then
    echo "SURVIVED  $name"
    survived=1
  else
    first=$(grep -m1 -E '^(FAILED|ERROR) ' "$log" || tail -n 3 "$log")
    why=$(grep -m1 -E '^E ' "$log" | cut -c1-400 || true)
    echo "caught    $name: $first"
    echo "          $why"
  fi
done
exit $survived
