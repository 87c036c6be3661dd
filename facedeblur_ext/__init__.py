"""facedeblur_ext: fused C++/CUDA ops, layers, models and tools for face deblurring.

Importing the package loads the native library ``facedeblur_ext._C``, which registers the ops
under ``torch.ops.facedeblur_ext``. Optional dependencies (MediaPipe, metric weights) are
imported only by the functions that need them.
"""

from ._extension import build_info, load_extension
from ._version import __version__

load_extension()

# These need the native library loaded first (they register fake kernels for its ops).
from . import nn, ops  # noqa: E402

__all__ = ["__version__", "build_info", "ops", "nn"]
