"""Weight interpolation of two exported CFMD-GAN checkpoints (WiSE-FT, Wortsman et al. 2022):
alpha * fine-tuned + (1 - alpha) * base, generator weights only; the fine-tuned file's config
and inference record are kept. Used for the probe in
benchmarks/results/eval_cfmd_stage_c_wise_probe (see the default checkpoint's model card).

Usage: python scripts/interpolate_checkpoints.py BASE.pt FINE_TUNED.pt ALPHA OUT.pt
"""
import sys

import torch

base_path, tuned_path, alpha, out_path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
base = torch.load(base_path, map_location="cpu", weights_only=False)
tuned = torch.load(tuned_path, map_location="cpu", weights_only=False)
gb, gt = base["models"]["generator"], tuned["models"]["generator"]
assert gb.keys() == gt.keys()
mixed = {k: (alpha * gt[k].float() + (1 - alpha) * gb[k].float()).to(gt[k].dtype)
         if gt[k].is_floating_point() else gt[k] for k in gt}
tuned["models"]["generator"] = mixed
tuned.setdefault("info", {})["weight_interpolation"] = {
    "alpha": alpha, "base": base_path, "fine_tuned": tuned_path}
torch.save(tuned, out_path)
print("wrote", out_path)
