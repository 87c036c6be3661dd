"""``facedeblur deblur`` as a user meets it: how inputs are read, where outputs go, bad files,
option checks. The model is replaced by the identity (the tiny-checkpoint end-to-end runs are in
test_cfmd.py and test_eval.py), so that each output is exactly the image the command read."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from facedeblur_ext.commands import deblur
from facedeblur_ext.data import load_rgb

FACES = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
FACE = FACES / "celeba_201418.png"


class _IdentityGenerator:
    """CFMD-GAN's ``restore`` interface, returning its input."""

    def restore(self, blurry, u):
        return blurry.clamp(0, 1)


@pytest.fixture
def identity_model(monkeypatch, tmp_path):
    """``--checkpoint`` arguments whose model is the identity (for --full-photo too: its
    loader is ``load_generator`` as well)."""
    from facedeblur_ext.models import cfmd

    monkeypatch.setattr(cfmd, "load_generator", lambda *args, **kwargs: _IdentityGenerator())
    monkeypatch.setenv("FACEDEBLUR_CACHE_DIR", str(tmp_path / "face_cache"))
    checkpoint = tmp_path / "stand_in.pt"
    checkpoint.write_bytes(b"")
    return ["--checkpoint", str(checkpoint), "--device", "cpu"]


def run_deblur(argv) -> int:
    """The command's ``run`` on parsed ``argv`` (errors propagate as exceptions)."""
    parser = argparse.ArgumentParser(prog="facedeblur deblur")
    deblur.configure(parser)
    return deblur.run(parser.parse_args([str(a) for a in argv]))


def as_array(path):
    with Image.open(path) as image:
        return np.asarray(image)


def test_inputs_are_read_with_exif_orientation_and_16_bit_grayscale(tmp_path, identity_model):
    rgb = load_rgb(FACE)
    inputs = tmp_path / "in"
    inputs.mkdir()
    gray16 = rgb[..., 1].astype(np.uint16) * 257
    Image.fromarray(gray16).save(inputs / "gray16.png")
    assert Image.open(inputs / "gray16.png").mode == "I;16"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 128 x 96, shown rotated: 96 wide, 128 high
    Image.fromarray(rgb[16:112]).save(inputs / "rotated.jpg", exif=exif.tobytes(), quality=95)

    out = tmp_path / "out"
    assert run_deblur([inputs, "-o", out, "--frames", "1", *identity_model]) == 0
    expected_gray = np.repeat(rgb[..., 1:2], 3, axis=2)
    np.testing.assert_array_equal(as_array(out / "gray16.png"), expected_gray)
    rotated = as_array(out / "rotated.png")
    assert rotated.shape == (128, 96, 3)
    np.testing.assert_array_equal(rotated, load_rgb(inputs / "rotated.jpg"))


def test_inputs_sharing_a_stem_get_distinct_outputs(tmp_path, identity_model):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rgb = load_rgb(FACE)
    Image.fromarray(rgb).save(inputs / "face.png")
    Image.fromarray(rgb[::-1].copy()).save(inputs / "face.bmp")
    Image.fromarray(rgb).save(inputs / "other.png")
    out = tmp_path / "out"
    assert run_deblur([inputs, "-o", out, "--frames", "1", *identity_model]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["face_bmp.png", "face_png.png", "other.png"]
    np.testing.assert_array_equal(as_array(out / "face_png.png"), rgb)
    np.testing.assert_array_equal(as_array(out / "face_bmp.png"), rgb[::-1])

    frames = tmp_path / "frames"
    assert run_deblur([inputs, "-o", frames, "--frames", "2", *identity_model]) == 0
    assert sorted(p.name for p in frames.iterdir()) == [
        "face_bmp", "face_bmp.gif", "face_png", "face_png.gif", "other", "other.gif"]


@pytest.mark.parametrize("extra", [["--frames", "1"], ["--full-photo"]])
def test_an_output_that_would_replace_an_input_is_refused_before_any_work(
        tmp_path, identity_model, monkeypatch, extra):
    from facedeblur_ext.models import cfmd

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(load_rgb(FACE)).save(inputs / "face.png")
    Image.open(FACE).convert("RGB").save(inputs / "second.jpg")
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cfmd, "load_generator", no_model)
    with pytest.raises(ValueError, match=r"in/face\.png would replace the input .*--output"):
        run_deblur([inputs, "-o", inputs, *extra, *identity_model])
    with pytest.raises(ValueError, match="would replace the input"):
        run_deblur([inputs / "face.png", "-o", inputs, *extra, *identity_model])
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before


def test_a_bad_file_is_skipped_and_the_batch_exits_1(tmp_path, identity_model, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(load_rgb(FACE)).save(inputs / "a_face.png")
    (inputs / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    (inputs / "c_text.jpg").write_text("hello")
    Image.fromarray(load_rgb(FACES / "celeba_201421.png")).save(inputs / "d_face.png")

    out = tmp_path / "out"
    assert run_deblur([inputs, "-o", out, "--frames", "1", *identity_model]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a_face.png", "d_face.png"]
    err = capsys.readouterr().err
    assert "skipped" in err and "b_corrupt.png: unreadable" in err and "c_text.jpg" in err
    assert "2 of 4 input(s) could not be read" in err


def test_full_photo_skips_a_bad_file_and_keeps_going(tmp_path, identity_model, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    Image.fromarray(load_rgb(FACE)).save(inputs / "b_face.png")
    out = tmp_path / "out"
    assert run_deblur([inputs, "-o", out, "--full-photo", "--face-size", "64",
                       *identity_model]) == 1
    assert [p.name for p in out.iterdir()] == ["b_face.png"]
    assert "1 of 2 input(s) could not be read" in capsys.readouterr().err


def test_a_rerun_with_fewer_frames_leaves_only_the_new_sweep(tmp_path, identity_model):
    out = tmp_path / "out"
    assert run_deblur([FACE, "-o", out, "--frames", "5", *identity_model]) == 0
    (out / "celeba_201418" / "notes.txt").write_text("not ours")
    assert run_deblur([FACE, "-o", out, "--frames", "2", *identity_model]) == 0
    assert sorted(p.name for p in (out / "celeba_201418").iterdir()) == [
        "frame_000_u0.000.png", "frame_001_u1.000.png", "notes.txt"]


@pytest.mark.parametrize("option, value, message", [
    ("--fps", "0", "argument --fps: must be above 0"),
    ("--fps", "nan", "argument --fps: must be above 0"),
    ("--frames", "0", "argument --frames: must be at least 1"),
    ("--face-size", "0", "argument --face-size: must be at least 1"),
    ("--face-size", "-64", "argument --face-size: must be at least 1"),
    ("--face-margin", "0", "argument --face-margin: must be above 0"),
])
def test_bad_option_values_are_refused_up_front(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as stop:
        run_deblur([FACE, "-o", tmp_path / "out", "--full-photo", option, value])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_full_photo_geometry_refuses_a_non_positive_margin_or_size():
    from facedeblur_ext.full_photo import PhotoFace, crop_matrix, restore_photo

    face = PhotoFace(np.array([10.0, 10.0, 50.0, 50.0]), np.array([[20.0, 25.0], [40.0, 25.0]]),
                     0.9)
    for margin in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="margin must be above 0"):
            crop_matrix(face, 64, margin)
    photo = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="crop size must be at least 1"):
        restore_photo(photo, lambda x: x, size=0, faces=[face])


def test_gif_frame_time_refuses_a_non_positive_rate():
    assert deblur.gif_frame_ms(8.0) == 120
    with pytest.raises(ValueError, match="frame rate must be above 0"):
        deblur.gif_frame_ms(0)
