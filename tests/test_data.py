"""Face data pipeline: MediaPipe analysis, masks, FMR, datasets and ``facedeblur synth``.

Runs on the real faces bundled in the repository (facedeblur_ext/assets/faces, tests/data).
One FaceAnalyzer (and one MediaPipe initialisation) is shared by the whole session.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT

from facedeblur_ext.data import (
    CLASS_TO_REGION,
    PARSING_CLASSES,
    REGION_NAMES,
    BadImageError,
    FaceAnalyzer,
    FrameReadError,
    FrameStackDataset,
    KernelBlurDataset,
    NoFaceWarning,
    SNADNetDataset,
    VideoFrames,
    center_transform,
    collate_frame_stacks,
    control_factors,
    crf_average,
    crf_average_uint8,
    fill_missing,
    fmr_order,
    identity_transform,
    left_eye_after_transform,
    load_rgb,
    random_transform,
    render_masks,
)
from facedeblur_ext.data import face as face_module
from facedeblur_ext.data.io import probe_image

ASSETS = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
SHARP_FACES = sorted(ASSETS.glob("celeba_*.png"))[:4] + sorted(ASSETS.glob("ffhq_*.png"))
FRAMES = sorted((REPO_ROOT / "tests" / "data" / "frames_vd001").glob("*.png"))
GRAYSCALE = REPO_ROOT / "tests" / "data" / "grayscale_yale.png"


# ---- fixtures and helpers --------------------------------------------------------------------

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("face_cache")


@pytest.fixture(scope="session")
def analyzer(cache_dir):
    pytest.importorskip("mediapipe", reason="the 'face' extra (mediapipe) is not installed")
    return FaceAnalyzer(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def ffhq(analyzer):
    image = load_rgb(ASSETS / "ffhq_00000.png")
    return image, analyzer.analyze(image)


class GaussianBlurStandIn(torch.nn.Module):
    """Test stand-in with BlurSynthesizer's interface: a Gaussian blur of random sigma."""

    def __init__(self, config=None, generator=None):
        super().__init__()
        self.generator = generator
        self.size = 9

    def forward(self, images, mask=None, return_info=False):
        n, c = images.shape[:2]
        sigma = 0.8 + 1.7 * torch.rand(n, generator=self.generator)
        r = torch.arange(self.size, dtype=images.dtype) - self.size // 2
        g = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
        kernels = g[:, :, None] * g[:, None, :]
        kernels = kernels / kernels.sum((1, 2), keepdim=True)
        pad = self.size // 2
        x = F.pad(images, (pad,) * 4, mode="reflect")
        weight = kernels.repeat_interleave(c, 0)[:, None]
        out = F.conv2d(x.reshape(1, n * c, *x.shape[2:]), weight, groups=n * c)
        out = out.reshape(n, c, *images.shape[2:])
        if mask is not None:
            out = mask * out + (1 - mask) * images
        if return_info:
            return out, {"kernels": kernels, "sigma": sigma}
        return out


def _write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _shifted(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def _run_cli(argv) -> int:
    from facedeblur_ext.cli import main

    return main(["synth", *map(str, argv), "--no-progress"])


# ---- contours and analysis -------------------------------------------------------------------

def _edges(cycle, closed=True):
    pairs = list(zip(cycle, cycle[1:])) + ([(cycle[-1], cycle[0])] if closed else [])
    return {frozenset(p) for p in pairs}


def test_contours_are_the_mediapipe_connection_sets():
    pytest.importorskip("mediapipe")
    from mediapipe.python.solutions import face_mesh_connections as mc

    def undirected(connections):
        return {frozenset(e) for e in connections}

    assert _edges(face_module.FACE_OVAL) == undirected(mc.FACEMESH_FACE_OVAL)
    assert _edges(face_module.LEFT_EYE) == undirected(mc.FACEMESH_LEFT_EYE)
    assert _edges(face_module.RIGHT_EYE) == undirected(mc.FACEMESH_RIGHT_EYE)
    assert (_edges(face_module.LIPS_OUTER) | _edges(face_module.LIPS_INNER)
            == undirected(mc.FACEMESH_LIPS))
    for brow, connections in ((face_module.LEFT_EYEBROW, mc.FACEMESH_LEFT_EYEBROW),
                              (face_module.RIGHT_EYEBROW, mc.FACEMESH_RIGHT_EYEBROW)):
        # upper edge + lower edge; the polygon adds the two closing edges at the ends
        upper, lower = brow[:5], brow[5:]
        assert _edges(upper, False) | _edges(lower, False) == undirected(connections)
    assert set(face_module.NOSE_POINTS) == {i for e in mc.FACEMESH_NOSE for i in e}
    assert set(face_module.LEFT_EYE_CORNERS) <= set(face_module.LEFT_EYE)
    assert set(face_module.RIGHT_EYE_CORNERS) <= set(face_module.RIGHT_EYE)


@pytest.mark.parametrize("path", SHARP_FACES, ids=lambda p: p.stem)
def test_mesh_found_on_sharp_faces(analyzer, path):
    image = load_rgb(path)
    result = analyzer.analyze(image)
    assert result.source == "mesh" and result.found
    assert result.landmarks.shape == (478, 3)
    h, w = image.shape[:2]
    assert (result.landmarks[:, 0] >= -2).all() and (result.landmarks[:, 0] <= w + 2).all()
    # the subject's left eye appears on the image's right for these frontal faces
    assert result.left_eye[0] > result.right_eye[0] + 0.15 * w
    x0, y0, x1, y1 = result.box
    assert x0 < result.right_eye[0] < result.left_eye[0] < x1
    assert y0 < result.left_eye[1] < y1
    assert 0.5 < result.score <= 1.0


def test_face_mask_covers_the_landmarks(analyzer):
    import cv2

    for path in SHARP_FACES:
        image = load_rgb(path)
        result = analyzer.analyze(image)
        for transform in (identity_transform(image.shape[:2]),
                          random_transform(np.random.default_rng(1), image.shape[:2], 96,
                                           base_size=112, flip_prob=1.0)):
            masks = render_masks(result, transform, soft=False)
            # landmarks on the oval lie on the polygon's edge: allow one pixel of rasterization
            face = cv2.dilate(masks["face"], np.ones((3, 3), np.uint8))
            pts = transform.apply_points(result.landmarks[:, :2])
            h, w = transform.out_size
            inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
            assert inside.sum() > 100
            cols, rows = np.floor(pts[inside]).astype(int).T
            assert face[rows, cols].all(), path.name
            # and the mask is not trivially the whole picture
            assert 0.15 < masks["face"].mean() < 0.9


def test_regions_partition_the_image(analyzer):
    for path in SHARP_FACES:
        image = load_rgb(path)
        result = analyzer.analyze(image)
        hard = render_masks(result, soft=False)
        regions = hard["regions"]
        assert regions.shape == (len(REGION_NAMES), *image.shape[:2])
        assert set(np.unique(regions)) <= {0.0, 1.0}
        np.testing.assert_array_equal(regions.sum(0), 1.0)
        np.testing.assert_array_equal(regions.argmax(0), CLASS_TO_REGION[hard["parsing"]])
        facial, skin, hair, background = regions
        assert facial.sum() > 0.02 * facial.size and skin.sum() > 0.1 * skin.size
        # face mask = facial parts + skin; hair = person minus face
        np.testing.assert_array_equal(hard["face"], facial + skin)
        person = center_transform(image.shape[:2]).apply_image(result.person,
                                                               interpolation="linear")
        assert not (hair.astype(bool) & (person < 128)).any()
        assert hard["parsing"].max() < len(PARSING_CLASSES)
        for name in ("eyes", "brows", "nose", "lips"):
            assert (hard["parsing"] == PARSING_CLASSES.index(name)).any(), (path.name, name)

        soft = render_masks(result, soft=True)
        assert soft["regions"].min() >= 0 and soft["regions"].max() <= 1
        np.testing.assert_allclose(soft["regions"].sum(0), 1.0, atol=1e-5)
        assert 0 < soft["face"].min() + 1e-6 and soft["face"].max() <= 1
        # soft and hard agree away from the boundaries
        assert np.abs(soft["regions"] - regions).mean() < 0.1


def test_hair_region_on_a_photo_with_hair(ffhq):
    image, result = ffhq
    regions = render_masks(result, soft=False)["regions"]
    assert regions[REGION_NAMES.index("hair")].mean() > 0.05
    assert regions[REGION_NAMES.index("background")].mean() > 0.05


def test_left_eye_under_a_horizontal_flip(analyzer, ffhq):
    image, result = ffhq
    flipped = np.ascontiguousarray(image[:, ::-1])
    result_flipped = analyzer.analyze(flipped)
    w = image.shape[1]
    # the person's left eye in the mirrored picture is the source's right eye, mirrored
    np.testing.assert_allclose(result_flipped.left_eye,
                               [w - result.right_eye[0], result.right_eye[1]], atol=2.0)
    transform = random_transform(np.random.default_rng(0), image.shape[:2], 256,
                                 scale_range=(1.0, 1.0), flip_prob=1.0)
    assert transform.flip and transform.offset == (0, 0)
    np.testing.assert_allclose(left_eye_after_transform(result, transform),
                               result_flipped.left_eye, atol=2.0)


def test_disk_cache_is_reused_and_survives_damage(analyzer, cache_dir, ffhq):
    image, result = ffhq
    fresh = FaceAnalyzer(cache_dir=cache_dir)
    again = fresh.analyze(image)
    assert fresh.stats == {"memory_hits": 0, "disk_hits": 1, "computed": 0}
    np.testing.assert_array_equal(again.landmarks, result.landmarks)
    np.testing.assert_array_equal(again.person, result.person)
    entries = list((cache_dir / "face_analysis").rglob("*"))
    assert not [p for p in entries if p.name.endswith(".tmp")]
    # a damaged entry is recomputed, not fatal
    path = fresh._cache_path(fresh.cache_key(image))
    path.write_bytes(b"garbage")
    third = FaceAnalyzer(cache_dir=cache_dir)
    np.testing.assert_allclose(third.analyze(image).landmarks, result.landmarks, atol=1e-3)
    assert third.stats["computed"] == 1
    assert path.read_bytes()[:4] == b"FDFA"


def test_blurry_input_without_face_warns_and_falls_back(analyzer):
    import cv2

    image = load_rgb(SHARP_FACES[0])
    kernel = np.full((1, 61), 1 / 61, np.float32)
    smeared = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    flat = np.zeros((96, 128, 3), np.uint8)
    flat[..., 0], flat[..., 1], flat[..., 2] = 90, 120, 150
    for picture, allowed in ((smeared, {"detection", "prior"}), (flat, {"prior"})):
        with pytest.warns(NoFaceWarning, match="no face mesh found"):
            result = analyzer.analyze(picture)
        assert result.source in allowed and result.landmarks is None
        masks = render_masks(result, soft=False)
        np.testing.assert_array_equal(masks["regions"].sum(0), 1.0)
        assert masks["regions"][0].sum() == 0  # no facial parts without a mesh
        assert 0.1 < masks["face"].mean() < 0.8
        assert result.left_eye[0] > result.right_eye[0]
    assert not result.found
    np.testing.assert_allclose(result.ellipse[:2], [0.5 * 128, 0.52 * 96], atol=1e-3)


def test_missing_mediapipe_raises_an_import_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    fresh = FaceAnalyzer(cache_dir=tmp_path)
    with pytest.raises(ImportError, match=r"pip install -e \.\[face\]"):
        fresh.analyze(load_rgb(SHARP_FACES[0]))


# ---- FMR and frame averaging -----------------------------------------------------------------

def test_fmr_order_follows_the_three_rules():
    eye = np.array([
        [30.0, 5.0],   # t0
        [10.2, 9.0],   # t1  x ties with t2 on the 1 px grid, larger y
        [10.7, 4.0],   # t2
        [20.0, 7.0],   # t3  (x, y) ties with t5 -> time order
        [5.0, 50.0],   # t4  smallest x
        [20.0, 7.0],   # t5
    ])
    np.testing.assert_array_equal(fmr_order(eye), [4, 2, 1, 3, 5, 0])
    # without a grid 10.2 < 10.7 decides
    np.testing.assert_array_equal(fmr_order(eye, grid=None), [4, 1, 2, 3, 5, 0])
    np.testing.assert_allclose(control_factors(7), [0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7])
    np.testing.assert_allclose(control_factors(5), np.arange(5) / 5)
    filled = fill_missing(np.array([[0, 0], [9, 9], [4, 2], [9, 9]], float),
                          [True, False, True, False])
    np.testing.assert_allclose(filled, [[0, 0], [2, 1], [4, 2], [4, 2]])


def test_crf_average():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(7, 8, 9, 3), dtype=np.uint8)
    f = frames.astype(np.float64) / 255
    expected = np.mean(f ** 2.2, axis=0) ** (1 / 2.2)
    np.testing.assert_allclose(crf_average(f, 2.2), expected, atol=1e-12)
    np.testing.assert_allclose(crf_average_uint8(list(frames), 2.2), expected, atol=2e-6)
    np.testing.assert_allclose(crf_average_uint8(list(frames), None), f.mean(0), atol=1e-6)
    same = np.repeat(frames[:1], 5, axis=0)
    np.testing.assert_allclose(crf_average_uint8(list(same)), f[0], atol=2e-6)
    t = torch.from_numpy(f)
    torch.testing.assert_close(crf_average(t, 2.2), torch.from_numpy(expected))
    # the gamma average is brighter than the plain one for mixed content (Jensen)
    assert crf_average(f, 2.2).mean() > f.mean(0).mean()


@pytest.fixture(scope="module")
def moving_face(tmp_path_factory, analyzer):
    """A face translated horizontally by known amounts, in a shuffled time order; frame 5 is
    an exact copy of frame 0 (a tie on (x, y) that must be broken by time)."""
    image = load_rgb(ASSETS / "ffhq_00000.png")
    shifts = [8.0, -16.0, 0.0, 16.0, -8.0, 8.0, 24.0]
    folder = tmp_path_factory.mktemp("moving") / "clip"
    for t, dx in enumerate(shifts):
        _write_png(folder / f"{t:03d}.png", _shifted(image, dx, 0.0))
    return folder, np.array(shifts)


def test_fmr_on_a_constructed_sequence(moving_face, analyzer):
    folder, shifts = moving_face
    t = np.arange(len(shifts))
    expected = np.lexsort((t, shifts))            # ascending x, ties by time
    assert list(expected) == [1, 4, 2, 0, 5, 3, 6]
    common = dict(num_frames=7, analyzer=analyzer, crop_size=256, base_size=None,
                  scale_range=(1.0, 1.0), quantize=False, seed=0)
    plain = FrameStackDataset(folder, augment=False, **common)[0]
    np.testing.assert_array_equal(plain["frame_indices"].numpy(), expected)
    np.testing.assert_allclose(plain["u"].numpy(), np.arange(7) / 7)
    assert np.all(np.diff(plain["eye_xy"][:, 0].numpy()) >= 0)

    frames = [load_rgb(folder / f"{k:03d}.png") for k in range(7)]
    np.testing.assert_allclose(plain["blurry"].permute(1, 2, 0).numpy(),
                               crf_average_uint8(frames, 2.2), atol=1e-6)
    for rank, k in enumerate(expected):
        np.testing.assert_allclose(plain["sharp"][rank].permute(1, 2, 0).numpy(),
                                   frames[k] / 255.0, atol=1e-6)

    # Mirrored samples: the eye now moves the other way, so the order reverses (ties by time)
    flipped = FrameStackDataset(folder, augment=True, flip_prob=1.0, **common)[0]
    np.testing.assert_array_equal(flipped["frame_indices"].numpy(), np.lexsort((t, -shifts)))
    assert np.all(np.diff(flipped["eye_xy"][:, 0].numpy()) >= 0)
    torch.testing.assert_close(flipped["sharp"][0], plain["sharp"][-1].flip(-1))


# ---- datasets --------------------------------------------------------------------------------

def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_kernel_dataset_shapes_and_determinism(analyzer):
    kwargs = dict(analyzer=analyzer, crop_size=64, seed=3, return_regions=True,
                  return_parsing=True)
    ds = KernelBlurDataset(SHARP_FACES, GaussianBlurStandIn(), **kwargs)
    assert len(ds) == len(SHARP_FACES)
    sample = ds[1]
    assert sample["sharp"].shape == sample["blurry"].shape == (3, 64, 64)
    assert sample["sharp"].dtype == torch.float32
    assert 0 <= sample["sharp"].min() and sample["sharp"].max() <= 1
    assert sample["face_mask"].shape == (1, 64, 64)
    assert sample["regions"].shape == (4, 64, 64)
    assert sample["parsing"].shape == (64, 64) and sample["parsing"].dtype == torch.int64
    assert bool(sample["face_found"]) and int(sample["index"]) == 1
    assert not torch.equal(sample["sharp"], sample["blurry"])

    again = KernelBlurDataset(SHARP_FACES, GaussianBlurStandIn(), **kwargs)
    for index in (0, 1, 4):
        _assert_same(ds[index], again[index])
    other_seed = KernelBlurDataset(SHARP_FACES, GaussianBlurStandIn(), **{**kwargs, "seed": 4})
    assert not torch.equal(other_seed[1]["sharp"], sample["sharp"])
    again.set_epoch(1)
    assert not torch.equal(again[1]["sharp"], sample["sharp"])
    # the caller's global RNG is not disturbed by the per-sample seeding
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _ = ds[0]
    torch.testing.assert_close(torch.rand(3), expected)


class _NoAnalysis:
    def analyze(self, *args, **kwargs):
        raise AssertionError("face_masks=False must not analyze faces")


def test_kernel_dataset_without_face_masks_skips_the_analysis(analyzer):
    common = dict(crop_size=64, seed=3)
    plain = KernelBlurDataset(SHARP_FACES, GaussianBlurStandIn(), analyzer=_NoAnalysis(),
                              face_masks=False, **common)
    with_masks = KernelBlurDataset(SHARP_FACES, GaussianBlurStandIn(), analyzer=analyzer,
                                   **common)
    a, b = plain[2], with_masks[2]
    assert set(a) == {"sharp", "blurry", "index"}
    # Same crop and blur: only the mask keys differ.
    torch.testing.assert_close(a["sharp"], b["sharp"], rtol=0, atol=0)
    torch.testing.assert_close(a["blurry"], b["blurry"], rtol=0, atol=0)
    for bad in (dict(blur_region="face"), dict(return_regions=True),
                dict(return_parsing=True), dict(on_no_face="skip")):
        with pytest.raises(ValueError, match="face_masks=False"):
            KernelBlurDataset(SHARP_FACES, GaussianBlurStandIn(), analyzer=_NoAnalysis(),
                              face_masks=False, **common, **bad)


def test_face_only_blur_keeps_the_background_sharp(analyzer):
    common = dict(analyzer=analyzer, crop_size=96, seed=5, return_blur_info=True)
    whole = KernelBlurDataset(SHARP_FACES[4:], GaussianBlurStandIn(), **common)
    face = KernelBlurDataset(SHARP_FACES[4:], GaussianBlurStandIn(), blur_region="face",
                             **common)
    a, b = whole[0], face[0]
    torch.testing.assert_close(a["sharp"], b["sharp"])
    torch.testing.assert_close(a["blur_info"]["sigma"], b["blur_info"]["sigma"])  # same kernel
    outside = (b["face_mask"] < 1e-4).expand_as(b["sharp"])
    inside = (b["face_mask"] > 0.999).expand_as(b["sharp"])
    assert outside.float().mean() > 0.1 and inside.float().mean() > 0.1
    torch.testing.assert_close(b["blurry"][outside], b["sharp"][outside], atol=1e-3, rtol=0)
    # inside, the blend weight is above 0.999: the whole-image blur up to 0.1 % of the change
    torch.testing.assert_close(b["blurry"][inside], a["blurry"][inside], atol=1e-3, rtol=0)
    assert (a["blurry"][outside] - a["sharp"][outside]).abs().mean() > 1e-3


def test_snadnet_dataset_regions_match_parsing(analyzer):
    ds = SNADNetDataset(SHARP_FACES, GaussianBlurStandIn(), analyzer=analyzer, crop_size=80,
                        soft_masks=False, seed=1)
    for index in range(3):
        s = ds[index]
        regions, parsing = s["regions"], s["parsing"]
        torch.testing.assert_close(regions.sum(0), torch.ones(80, 80))
        torch.testing.assert_close(regions.argmax(0),
                                   torch.from_numpy(CLASS_TO_REGION)[parsing])
        torch.testing.assert_close(s["face_mask"][0], regions[0] + regions[1])
        assert s["blurry"].shape == (3, 80, 80)


def test_dataloader_workers_give_the_same_batches(analyzer):
    from torch.utils.data import DataLoader

    ds = KernelBlurDataset(SHARP_FACES, GaussianBlurStandIn(), analyzer=analyzer,
                           crop_size=48, seed=11, return_regions=True)
    serial = list(DataLoader(ds, batch_size=3, num_workers=0))
    parallel = list(DataLoader(ds, batch_size=3, num_workers=2))
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        _assert_same(a, b)
    assert serial[0]["sharp"].shape == (3, 3, 48, 48)
    # persistent workers follow set_epoch() of the main process
    loader = DataLoader(ds, batch_size=6, num_workers=2, persistent_workers=True)
    first = next(iter(loader))
    ds.set_epoch(1)
    second = next(iter(loader))
    ds.set_epoch(0)
    torch.testing.assert_close(first["sharp"], torch.cat([b["sharp"] for b in serial]))
    assert not torch.equal(first["sharp"], second["sharp"])


def test_frame_dataset_variable_length_and_video_source(tmp_path, analyzer):
    import cv2

    video = tmp_path / "clip.avi"
    # (MJPG stores even sizes only)
    frames = [np.ascontiguousarray(load_rgb(p)[:310, :270]) for p in FRAMES]
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (w, h))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    reader = VideoFrames(video)
    assert len(reader) == len(frames)
    decoded = reader.read(2, 3)
    assert len(decoded) == 3 and decoded[0].shape == frames[0].shape
    assert np.abs(decoded[0].astype(int) - frames[2]).mean() < 6  # MJPG is lossy
    # seeks backwards, skips forwards and straight continuations all give the same frames
    every = VideoFrames(video).read(0, 7)
    for start, count in ((0, 2), (3, 2), (5, 2), (1, 3), (6, 1)):
        for k, frame in enumerate(reader.read(start, count)):
            np.testing.assert_array_equal(frame, every[start + k])
    with pytest.raises(FrameReadError):
        reader.read(5, 3)

    ds = FrameStackDataset([video, FRAMES[0].parent], num_frames=(3, 5), stride=2,
                           analyzer=analyzer, crop_size=64, seed=7)
    assert len(ds) == 2 * 2  # windows start at 0 and 2 in each 7-frame source
    lengths = {ds.window_length(i) for i in range(len(ds))}
    assert lengths <= {3, 4, 5}
    samples = [ds[i] for i in range(len(ds))]
    for s in samples:
        n = int(s["num_frames"])
        assert s["sharp"].shape == (n, 3, 64, 64) and s["blurry"].shape == (3, 64, 64)
        np.testing.assert_allclose(s["u"].numpy(), np.arange(n) / n)
        assert sorted(s["frame_indices"].tolist()) == list(range(s["frame_indices"].min(),
                                                                 s["frame_indices"].min() + n))
        assert int(s["faces_found"]) == n
        assert s["face_mask"].shape == (1, 64, 64) and s["face_mask"].max() > 0.9
        assert float(s["target_u"]) in set(s["u"].tolist())
        rank = s["u"].tolist().index(float(s["target_u"]))
        torch.testing.assert_close(s["target"], s["sharp"][rank])
    _assert_same(samples[1], FrameStackDataset([video, FRAMES[0].parent], num_frames=(3, 5),
                                               stride=2, analyzer=analyzer, crop_size=64,
                                               seed=7)[1])
    batch = collate_frame_stacks(samples)
    n_max = max(int(s["num_frames"]) for s in samples)
    assert batch["sharp"].shape == (4, n_max, 3, 64, 64)
    assert batch["valid"].sum(1).tolist() == [int(s["num_frames"]) for s in samples]
    assert (batch["u"][~batch["valid"]] == -1).all()


# ---- bad inputs ------------------------------------------------------------------------------

@pytest.fixture()
def bad_files(tmp_path):
    rgb = load_rgb(SHARP_FACES[0])
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    (folder / "notanimage.jpg").write_text("hello")
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 200, np.uint8)], axis=2)
    _write_png(folder / "rgba.png", rgba, "RGBA")
    _write_png(folder / "gray_L.png", rgb[..., 1], "L")
    _write_png(folder / "gray_as_rgb.png", np.repeat(rgb[..., 1:2], 3, axis=2))
    _write_png(folder / "tiny.png", rgb[:20, :20])
    flat = np.zeros((128, 128, 3), np.uint8)
    flat[..., 0], flat[..., 2] = 40, 200
    _write_png(folder / "noface.png", flat)
    return folder


def test_bad_files_are_rejected_with_reasons(bad_files):
    expected = {"corrupt.png": "unreadable", "notanimage.jpg": "unreadable",
                "rgba.png": "alpha", "gray_L.png": "grayscale", "gray_as_rgb.png": "grayscale",
                "tiny.png": "too small"}
    for name, reason in expected.items():
        with pytest.raises(BadImageError, match=reason):
            load_rgb(bad_files / name, min_size=64)
    with pytest.raises(BadImageError, match="grayscale"):
        load_rgb(GRAYSCALE)
    assert load_rgb(GRAYSCALE, allow_grayscale=True).shape[2] == 3
    assert probe_image(bad_files / "rgba.png") is not None
    assert probe_image(bad_files / "gray_L.png") is not None
    assert probe_image(bad_files / "noface.png") is None


def test_dataset_skips_bad_files(bad_files, analyzer):
    import shutil

    for path in SHARP_FACES[:2]:
        shutil.copy(path, bad_files / path.name)
    with pytest.warns(UserWarning, match="skipping 5 of 9 images"):
        ds = KernelBlurDataset(bad_files, None, analyzer=analyzer, crop_size=64, min_size=64,
                               on_no_face="skip")
    # gray_as_rgb passes the header check and is replaced by the next image when loaded;
    # noface is replaced because on_no_face="skip"
    assert len(ds) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = [ds[i] for i in range(len(ds))]
    assert all(bool(s["face_found"]) for s in samples)
    assert "blurry" not in samples[0]


# ---- the synth command -----------------------------------------------------------------------

def test_cli_frames_end_to_end_and_resume(tmp_path, cache_dir, analyzer):
    import shutil

    import cv2

    src = tmp_path / "in"
    shutil.copytree(FRAMES[0].parent, src / "vd001")
    broken = src / "broken"
    broken.mkdir()
    for k, path in enumerate(FRAMES[:5]):
        shutil.copy(path, broken / f"{k:03d}.png")
    gray = load_rgb(FRAMES[2])[..., 0]
    _write_png(broken / "002.png", gray, "L")      # a grayscale frame spoils its window
    (src / "corrupt.mp4").write_bytes(b"not a video")
    out = tmp_path / "out"
    argv = ["--input", src, "--output", out, "--mode", "frames", "--num-frames", "3-4",
            "--stride", "2", "--size", "96", "--seed", "3", "--cache-dir", cache_dir]
    assert _run_cli(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = [r["name"] for r in manifest["items"]]
    assert "vd001__f000000" in names and "vd001__f000002" in names
    assert {s["item"] for s in manifest["skipped"]} >= {"corrupt", "broken__f000000"}
    reasons = " ".join(s["reason"] for s in manifest["skipped"])
    assert "grayscale" in reasons and "cannot open" in reasons
    record = next(r for r in manifest["items"] if r["name"] == "vd001__f000000")
    n = record["num_frames"]
    assert 3 <= n <= 4 and record["u"] == [i / n for i in range(n)]
    assert sorted(record["fmr_order"]) == record["frame_indices"] == list(range(n))
    xs = [p[0] for p in record["eye_xy"]]
    assert xs == sorted(xs)
    for rel in [record["files"]["blurry"], record["files"]["face_mask"], *record["files"]["sharp"]]:
        image = cv2.imread(str(out / rel), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape[:2] == (96, 96)
    # the blurry image is the CRF average of the written (resized) frames' sources
    frames = [load_rgb(src / "vd001" / f"{t + 1:05d}.png") for t in range(n)]
    blurry = center_transform(frames[0].shape[:2], 96, 96).apply_image(
        np.clip(np.rint(crf_average_uint8(frames) * 255), 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(load_rgb(out / record["files"]["blurry"]), blurry)

    # resume: nothing is redone; a removed record is redone alone
    stamp = (out / record["files"]["blurry"]).stat().st_mtime_ns
    (out / "records" / "vd001__f000002.json").unlink()
    assert _run_cli(argv) == 0
    manifest2 = json.loads((out / "manifest.json").read_text())
    assert manifest2["counts"]["made"] == 1
    assert manifest2["counts"]["already_done"] == len(names) - 1
    assert (out / record["files"]["blurry"]).stat().st_mtime_ns == stamp
    assert not list(out.rglob("*.tmp"))


def _kernel_cli_check(tmp_path, cache_dir, bad_files, mode):
    import shutil

    for path in SHARP_FACES[:3]:
        shutil.copy(path, bad_files / path.name)
    out = tmp_path / f"out_{mode}"
    argv = ["--input", bad_files, "--output", out, "--mode", mode, "--seed", "1",
            "--size", "64", "--cache-dir", cache_dir]
    assert _run_cli(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    made = sorted(r["name"] for r in manifest["items"])
    assert made == sorted(p.stem for p in SHARP_FACES[:3])
    skipped = {s["item"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"corrupt", "notanimage", "rgba", "gray_L", "gray_as_rgb", "tiny",
                            "noface"}
    assert "no face" in skipped["noface"] and "alpha" in skipped["rgba"]
    for record in manifest["items"]:
        for rel in record["files"].values():
            assert (out / rel).is_file()
        assert record["blur"]
        assert load_rgb(out / record["files"]["blurry"]).shape == (64, 64, 3)
    assert _run_cli(argv) == 0  # resume
    assert json.loads((out / "manifest.json").read_text())["counts"]["made"] == 0
    return out, manifest


def test_cli_kernel_modes_with_a_stand_in_synthesizer(tmp_path, cache_dir, bad_files,
                                                      analyzer, monkeypatch):
    from facedeblur_ext.commands import synth

    monkeypatch.setattr(synth, "_make_synthesizer", lambda config: GaussianBlurStandIn())
    out_whole, whole = _kernel_cli_check(tmp_path, cache_dir, bad_files, "kernel")
    out_face, face = _kernel_cli_check(tmp_path, cache_dir, bad_files, "face-only")
    for a, b in zip(whole["items"], face["items"]):
        assert a["seed"] == b["seed"] and a["blur"]["sigma"] == b["blur"]["sigma"]
        kernel = np.load(out_whole / a["files"]["info.kernels"])
        assert kernel.shape == (1, 9, 9) and abs(kernel.sum() - 1) < 1e-5
        sharp = load_rgb(out_face / b["files"]["sharp"]).astype(int)
        blurry = load_rgb(out_face / b["files"]["blurry"]).astype(int)
        mask = load_rgb(out_face / b["files"]["face_mask"], allow_grayscale=True)[..., 0]
        assert np.abs(sharp - blurry)[mask == 0].max() <= 1
        assert np.abs(sharp - blurry)[mask == 255].mean() > 1


def test_cli_kernel_mode_with_the_real_synthesizer(tmp_path, cache_dir, bad_files, analyzer):
    nn = pytest.importorskip("facedeblur_ext.nn")
    if not hasattr(nn, "BlurSynthesizer"):
        pytest.skip("facedeblur_ext.nn.BlurSynthesizer is not in this branch yet")
    _kernel_cli_check(tmp_path, cache_dir, bad_files, "kernel")


def test_cli_kernel_mode_without_synthesizer_fails_clearly(tmp_path, capsys):
    import facedeblur_ext.nn as nn

    if hasattr(nn, "BlurSynthesizer"):
        pytest.skip("BlurSynthesizer exists")
    code = _run_cli(["--input", ASSETS, "--output", tmp_path / "o", "--mode", "kernel"])
    assert code == 2
    err = capsys.readouterr().err
    assert "BlurSynthesizer" in err and "--mode frames works without it" in err
    assert not (tmp_path / "o").exists()


def test_cli_without_mediapipe_stops_with_the_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    code = _run_cli(["--input", FRAMES[0].parent, "--output", tmp_path / "o", "--mode", "frames",
                     "--num-frames", "5", "--cache-dir", tmp_path / "empty_cache"])
    assert code == 2
    assert "pip install -e .[face]" in capsys.readouterr().err
