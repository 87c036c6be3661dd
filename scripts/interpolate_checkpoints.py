"""Weight interpolation of two exported CFMD-GAN checkpoints (WiSE-FT, Wortsman et al. 2022):
alpha * fine-tuned + (1 - alpha) * base, generator weights only; the fine-tuned file's config
and inference record are kept. Used for the probe in
benchmarks/results/eval_cfmd_stage_c_wise_probe (see the default checkpoint's model card).

Usage: python scripts/interpolate_checkpoints.py BASE.pt FINE_TUNED.pt ALPHA OUT.pt
"""
import sys

from facedeblur_ext.training.checkpoint import atomic_torch_save, load_checkpoint

base_path, tuned_path, alpha, out_path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
base, tuned = load_checkpoint(base_path), load_checkpoint(tuned_path)
gb, gt = base["models"]["generator"], tuned["models"]["generator"]
if gb.keys() != gt.keys():
    sys.exit(f"{base_path} and {tuned_path} hold different generators (parameter names differ)")
mixed = {k: (alpha * gt[k].float() + (1 - alpha) * gb[k].float()).to(gt[k].dtype)
         if gt[k].is_floating_point() else gt[k] for k in gt}
tuned["models"]["generator"] = mixed
tuned.setdefault("info", {})["weight_interpolation"] = {
    "alpha": alpha, "base": base_path, "fine_tuned": tuned_path}
atomic_torch_save(tuned, out_path)
print("wrote", out_path)
