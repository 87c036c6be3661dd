"""``facedeblur deblur`` as a user meets it: how inputs are read, where outputs go, bad files,
option checks. The model is replaced by the identity (the tiny-checkpoint end-to-end runs are in
test_cfmd.py and test_eval.py), so that each output is exactly the image the command read."""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from facedeblur_ext.commands import deblur
from facedeblur_ext.data import load_rgb
from facedeblur_ext.data.io import gif_frame_ms

FACES = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
FACE = FACES / "celeba_201418.png"


class _IdentityGenerator(torch.nn.Module):
    """CFMD-GAN's ``restore`` interface, returning its input (a module, as the tiler looks
    for its global pools)."""

    def restore(self, blurry, u):
        return blurry.clamp(0, 1)


def stand_in_checkpoint(path, inference=None):
    """A checkpoint file holding only the task and, if given, the inference settings (the
    weights come from the monkeypatched loader)."""
    torch.save({"task": "cfmd", **({"inference": inference} if inference else {})}, path)
    return path


@pytest.fixture
def identity_model(monkeypatch, tmp_path):
    """``--checkpoint`` arguments whose model is the identity (for --full-photo too: its
    loader is ``load_generator`` as well), trained on moments over u in [0, 1]."""
    from facedeblur_ext.models import cfmd

    monkeypatch.setattr(cfmd, "load_generator", lambda *args, **kwargs: _IdentityGenerator())
    monkeypatch.setenv("FACEDEBLUR_CACHE_DIR", str(tmp_path / "face_cache"))
    checkpoint = stand_in_checkpoint(tmp_path / "stand_in.pt",
                                     {"moments": True, "u_range": [0.0, 1.0]})
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


@pytest.mark.parametrize("tile, overlap, message", [("8", "0", "at least 16 pixels"),
                                                     ("64", "40", r"overlap must be in \[0, ")])
def test_bad_tiles_are_refused_before_any_work(tmp_path, tile, overlap, message):
    with pytest.raises(ValueError, match=message):
        run_deblur([FACE, "-o", tmp_path / "out", "--tile", tile, "--tile-overlap", overlap])
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
    assert gif_frame_ms(8.0) == 120
    with pytest.raises(ValueError, match="frame rate must be above 0"):
        gif_frame_ms(0)


# ----------------------------------------------------------------------------- moments


class _CountingGenerator(_IdentityGenerator):
    """The identity, shifted by u (so frames differ), counting its calls; raises
    KeyboardInterrupt on call ``interrupt_at`` (a user's Ctrl-C)."""

    def __init__(self, interrupt_at=None):
        super().__init__()
        self.calls, self.interrupt_at = [], interrupt_at

    def restore(self, blurry, u):
        self.calls.append(u)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        return (blurry + 0.1 * u).clamp(0, 1)


@pytest.fixture
def counting_model(monkeypatch, tmp_path):
    from facedeblur_ext.models import cfmd

    holder = {"model": _CountingGenerator()}
    monkeypatch.setattr(cfmd, "load_generator", lambda *args, **kwargs: holder["model"])
    return holder


def test_frames_follow_the_checkpoint_moments(tmp_path, counting_model):
    moments = stand_in_checkpoint(tmp_path / "moments.pt",
                                  {"moments": True, "u_range": [0.0, 0.75]})
    out = tmp_path / "out"
    assert run_deblur([FACE, "-o", out, "--checkpoint", moments, "--device", "cpu"]) == 0
    frames = sorted(p.name for p in (out / "celeba_201418").iterdir())
    assert len(frames) == 7 and frames[0] == "frame_000_u0.000.png"  # default: 7 moments
    assert frames[-1] == "frame_006_u0.750.png"  # u_k = u_min + k (u_max - u_min) / 6
    assert counting_model["model"].calls == pytest.approx([0.125 * k for k in range(7)])

    still = stand_in_checkpoint(tmp_path / "still.pt")  # no inference table: one moment
    counting_model["model"] = _CountingGenerator()
    assert run_deblur([FACE, "-o", tmp_path / "one", "--checkpoint", still, "--device",
                       "cpu"]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["celeba_201418.png"]
    assert counting_model["model"].calls == [0.5]
    with pytest.raises(ValueError, match="restores one moment.*--frames 1"):
        run_deblur([FACE, "-o", tmp_path / "two", "--checkpoint", still, "--frames", "7"])
    assert not (tmp_path / "two").exists()


# ----------------------------------------------------------------------------- long runs


def test_frames_are_written_as_made_and_an_interrupted_sweep_resumes(tmp_path, identity_model,
                                                                     counting_model):
    out = tmp_path / "out"
    counting_model["model"] = _CountingGenerator(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_deblur([FACE, "-o", out, "--frames", "5", *identity_model])
    # Two complete frames, nothing half-written, no GIF yet.
    assert sorted(p.name for p in out.rglob("*")) == [
        "celeba_201418", "frame_000_u0.000.png", "frame_001_u0.250.png"]
    counting_model["model"] = _CountingGenerator()
    assert run_deblur([FACE, "-o", out, "--frames", "5", *identity_model]) == 0
    assert counting_model["model"].calls == [0.5, 0.75, 1.0]  # only the missing frames
    with Image.open(out / "celeba_201418.gif") as gif:
        assert gif.n_frames == 5

    counting_model["model"] = _CountingGenerator()
    assert run_deblur([FACE, "-o", out, "--frames", "5", *identity_model]) == 0
    assert counting_model["model"].calls == []  # a finished rerun skips the input
    assert run_deblur([FACE, "-o", out, "--frames", "5", "--redo", *identity_model]) == 0
    assert len(counting_model["model"].calls) == 5


def test_large_images_go_in_tiles_and_come_back_whole(tmp_path, identity_model, capsys):
    rgb = load_rgb(FACE)
    big = np.concatenate([np.concatenate([rgb, rgb[::-1]], axis=1)] * 2, axis=0)[:250, :230]
    Image.fromarray(big).save(tmp_path / "big.png")
    out = tmp_path / "out"
    assert run_deblur([tmp_path / "big.png", "-o", out, "--frames", "1", "--tile", "96",
                       "--tile-overlap", "32", *identity_model]) == 0
    np.testing.assert_array_equal(as_array(out / "big.png"), big)


class _MeanCentredGenerator(_IdentityGenerator):
    """Subtracts the image mean per channel through a global average pool (as CFMD-GAN's
    channel attention averages its features), counting the pool's runs."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.pool_runs = 0
        self.pool.register_forward_hook(lambda *args: setattr(self, "pool_runs",
                                                              self.pool_runs + 1))

    def restore(self, blurry, u):
        return (blurry - self.pool(blurry) + 0.5).clamp(0, 1)


def test_tiles_see_the_whole_image_mean_through_the_models_pools(tmp_path, counting_model):
    """deblur hands the model's global pools to the tiler: a first pass measures the
    whole-image mean, so tiles of a photo with a dark half come back as the whole image."""
    from facedeblur_ext.inference import tile_layout

    rgb = load_rgb(FACE)
    big = np.concatenate([np.concatenate([rgb, rgb[::-1]], axis=1)] * 2, axis=0)[:250, :230]
    big[:, 115:] //= 4
    Image.fromarray(big).save(tmp_path / "big.png")
    counting_model["model"] = model = _MeanCentredGenerator()
    checkpoint = stand_in_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "out"
    assert run_deblur([tmp_path / "big.png", "-o", out, "--tile", "96", "--tile-overlap", "32",
                       "--checkpoint", checkpoint, "--device", "cpu"]) == 0
    pixels = torch.from_numpy(big).permute(2, 0, 1)[None].float() / 255
    whole = (model.restore(pixels, 0.5)[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(as_array(out / "big.png").astype(float) - whole).max() <= 1
    tiles = len(tile_layout(250, 96, 32)) * len(tile_layout(230, 96, 32))
    assert model.pool_runs == 2 * tiles + 1  # two passes over the tiles, then the check above


# ----------------------------------------------------------------------------- before the work


def test_an_unwritable_output_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    from facedeblur_ext.models import cfmd

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cfmd, "load_generator", no_model)
    checkpoint = stand_in_checkpoint(tmp_path / "c.pt")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        run_deblur([FACE, "-o", blocker, "--checkpoint", checkpoint])
    with pytest.raises(OSError, match="cannot write to the output folder"):
        run_deblur([FACE, "-o", blocker / "sub", "--checkpoint", checkpoint])
    for extra in ([], ["--full-photo"]):
        with pytest.raises(OSError):
            run_deblur([FACE, "-o", blocker, "--checkpoint", checkpoint, *extra])


def test_no_output_folder_when_nothing_can_be_read(tmp_path, identity_model):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    (inputs / "b.jpg").write_text("hello")
    for extra in (["--frames", "1"], ["--full-photo"]):
        with pytest.raises(ValueError, match="none of the 2 input"):
            run_deblur([inputs, "-o", tmp_path / "out", *extra, *identity_model])
        assert not (tmp_path / "out").exists()


def test_full_photo_hides_third_party_logs_unless_verbose(tmp_path, identity_model, capfd):
    photo = tmp_path / "photo.png"
    Image.fromarray(load_rgb(FACES / "ffhq_00000.png")).save(photo)
    assert run_deblur([photo, "-o", tmp_path / "out", "--full-photo", "--face-size", "64",
                       *identity_model]) == 0
    captured = capfd.readouterr()
    noise = [line for line in captured.err.splitlines()
             if line.startswith(("I0000", "W0000", "INFO:", "WARNING: All log"))]
    assert noise == []
    assert "wrote 1 photo(s) with 1 restored face(s)" in captured.out


def test_the_deblur_commands_do_not_import_each_other():
    import ast

    source = (REPO_ROOT / "facedeblur_ext" / "commands" / "deblur_full_photo.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Import) for alias in node.names}
    assert "facedeblur_ext.commands.deblur" not in imported
    assert "facedeblur_ext.commands.deblur_common" in imported


@pytest.mark.parametrize("python_stream_on_descriptor_2", [False, True])
def test_native_stderr_hidden_hides_only_descriptor_2_and_shows_it_on_error(
        capfd, monkeypatch, python_stream_on_descriptor_2):
    from facedeblur_ext.commands.deblur_common import native_stderr_hidden

    if python_stream_on_descriptor_2:  # as in a terminal: sys.stderr writes to descriptor 2
        monkeypatch.setattr(sys, "stderr", open(2, "w", closefd=False))
    with native_stderr_hidden():
        os.write(2, b"native noise\n")
        print("python warning", file=sys.stderr)
    with pytest.raises(RuntimeError, match="boom"), native_stderr_hidden():
        os.write(2, b"native error\n")
        raise RuntimeError("boom")
    with native_stderr_hidden(verbose=True):
        os.write(2, b"verbose native\n")
    os.write(2, b"after\n")
    sys.stderr.flush()
    err = capfd.readouterr().err
    assert "native noise" not in err
    assert "python warning" in err
    assert "native error" in err and "verbose native" in err and "after" in err
