"""Pure-PyTorch references of every facedeblur_ext op.

Written for clarity, not speed: the oracle in tests and the baseline in benchmarks. Each
function has the signature and semantics of its fused counterpart in ``facedeblur_ext.ops``.
This package is never imported by ``facedeblur_ext``.
"""

__all__: list[str] = []
