"""Evaluation: the papers' protocols on our data, baselines, tables, plots (``facedeblur eval``).

- :mod:`.baselines`: unsharp masking and non-blind Wiener deconvolution.
- :mod:`.methods`: table rows (baselines and trained models behind one interface) and
  :func:`load_model`.
- :mod:`.scoring`: per-image metrics on top of :mod:`facedeblur_ext.metrics`, with ``n/a``
  columns when a metric's weights are missing.
- :mod:`.protocols`: kernel blur (SNADNet), frame averaging (CFMD-GAN: single-to-single and
  per frame count), whole-image vs face-only blur (thesis), and for issue 16 the moments of
  motion from still faces, linear motion, real video pairs and u-sweep pictures.
- :mod:`.report`: JSON, Markdown, PNG plots and example grids.
"""

from .baselines import auto_nsr, gaussian_blur, unsharp_mask, wiener_deconvolve
from .methods import (
    MODEL_FAMILIES,
    IdentityMethod,
    Method,
    ModelMethod,
    UnsharpMaskMethod,
    WienerMethod,
    baseline_methods,
    checkpoint_working_size,
    load_model,
)

__all__ = [
    "MODEL_FAMILIES",
    "IdentityMethod",
    "Method",
    "ModelMethod",
    "UnsharpMaskMethod",
    "WienerMethod",
    "auto_nsr",
    "baseline_methods",
    "checkpoint_working_size",
    "gaussian_blur",
    "load_model",
    "unsharp_mask",
    "wiener_deconvolve",
]
