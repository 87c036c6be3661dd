"""facedeblur_ext.data: face analysis, masks, FMR and training datasets.

- :mod:`.face`: MediaPipe face detection, 478-point mesh, eye positions and person
  segmentation with an on-disk cache keyed by image content (:class:`FaceAnalyzer`).
- :mod:`.masks`: face (foreground) mask, SNADNet's four region masks and parsing labels.
- :mod:`.fmr`: frame averaging with a camera response function and facial motion-based
  reordering (CFMD-GAN).
- :mod:`.geometry`: the CFMD augmentation (scale, crop, flip) applied to images, masks and
  landmarks alike.
- :mod:`.datasets`: :class:`KernelBlurDataset`, :class:`FrameStackDataset`,
  :class:`SNADNetDataset`.
- :mod:`.io`: strict image loading, video / frame-folder readers, atomic writes.

MediaPipe (the ``face`` extra) is imported only when an image has to be analysed.
"""

from .datasets import (
    FrameStackDataset,
    KernelBlurDataset,
    MotionBlurMixDataset,
    SNADNetDataset,
    blur_batch,
    collate_frame_stacks,
    run_synthesizer,
)
from .face import (
    MEDIAPIPE_HINT,
    FaceAnalysis,
    FaceAnalyzer,
    FacePrior,
    NoFaceWarning,
    build_analysis,
    import_mediapipe,
)
from .fmr import (
    control_factors,
    crf_average,
    crf_average_uint8,
    fill_missing,
    fmr_order,
    left_eye_after_transform,
)
from .geometry import CropTransform, center_transform, identity_transform, random_transform
from .io import (
    BadImageError,
    FrameFolder,
    FrameReadError,
    VideoFrames,
    atomic_write_bytes,
    content_hash,
    discover_frame_sources,
    list_images,
    load_rgb,
    open_frame_source,
    write_png,
)
from .masks import (
    CLASS_TO_REGION,
    PARSING_CLASSES,
    REGION_NAMES,
    face_mask,
    region_masks,
    regions_from_parsing,
    render_masks,
    render_parsing,
)

__all__ = [
    "BadImageError", "CLASS_TO_REGION", "CropTransform", "FaceAnalysis", "FaceAnalyzer",
    "FacePrior", "FrameFolder", "FrameReadError", "FrameStackDataset", "KernelBlurDataset",
    "MEDIAPIPE_HINT", "MotionBlurMixDataset", "NoFaceWarning", "PARSING_CLASSES", "REGION_NAMES",
    "SNADNetDataset",
    "VideoFrames", "atomic_write_bytes", "blur_batch", "build_analysis", "center_transform",
    "collate_frame_stacks", "content_hash", "control_factors", "crf_average",
    "crf_average_uint8", "discover_frame_sources", "face_mask", "fill_missing", "fmr_order",
    "identity_transform", "import_mediapipe", "left_eye_after_transform", "list_images",
    "load_rgb", "open_frame_source", "random_transform", "region_masks",
    "regions_from_parsing", "render_masks", "render_parsing", "run_synthesizer", "write_png",
]
