"""``facedeblur synth`` reruns into an existing output folder (the data set itself is tested in
test_data.py)."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
from conftest import REPO_ROOT

from facedeblur_ext.commands import synth

FACES = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"


def run_synth(argv) -> int:
    """The command's ``run`` on parsed ``argv`` (errors propagate as exceptions)."""
    parser = argparse.ArgumentParser(prog="facedeblur synth")
    synth.configure(parser)
    return synth.run(parser.parse_args([str(a) for a in argv] + ["--no-progress"]))


@pytest.fixture
def two_faces(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("celeba_201418.png", "celeba_201421.png"):
        shutil.copy(FACES / name, folder / name)
    return folder


def test_a_rerun_with_other_settings_is_refused(tmp_path, two_faces):
    out = tmp_path / "out"
    common = ["--input", two_faces, "--output", out, "--size", "64",
              "--cache-dir", tmp_path / "cache"]
    assert run_synth([*common, "--mode", "kernel", "--seed", "5"]) == 0
    manifest = (out / "manifest.json").read_text()
    blurry = (out / "blurry" / "celeba_201418.png").read_bytes()

    with pytest.raises(ValueError) as refused:
        run_synth([*common, "--mode", "face-only", "--seed", "0"])
    message = str(refused.value)
    assert "--mode was 'kernel', now 'face-only'" in message
    assert "--seed was 5, now 0" in message and "--size" not in message
    assert "new --output" in message
    assert (out / "manifest.json").read_text() == manifest
    assert (out / "blurry" / "celeba_201418.png").read_bytes() == blurry

    # What does not change how items are made may differ: the items are reused.
    assert run_synth([*common[:-1], tmp_path / "other_cache", "--mode", "kernel", "--seed", "5",
                      "--limit", "1"]) == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["already_done"] == 1 and counts["made"] == 0 and counts["items"] == 2


def test_the_settings_of_an_interrupted_run_are_checked(tmp_path, two_faces, monkeypatch):
    out = tmp_path / "out"
    common = ["--input", two_faces, "--output", out, "--size", "64", "--mode", "kernel",
              "--cache-dir", tmp_path / "cache"]
    real_item = synth._do_kernel_item
    made = []

    def interrupted_after_one(*args, **kwargs):
        if made:
            raise KeyboardInterrupt
        made.append(real_item(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(synth, "_do_kernel_item", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_synth([*common, "--seed", "5"])
    assert len(list((out / "records").glob("*.json"))) == 1
    monkeypatch.setattr(synth, "_do_kernel_item", real_item)
    with pytest.raises(ValueError, match="--seed was 5, now 6"):
        run_synth([*common, "--seed", "6"])
    assert run_synth([*common, "--seed", "5"]) == 0  # resumes
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["made"] == 1 and counts["already_done"] == 1


def test_frame_settings_compare_by_meaning():
    base = {"mode": "frames", "seed": 0, "size": None, "min_size": 64, "crf_gamma": 2.2,
            "fmr_grid": 1.0}
    assert (synth._recipe({**base, "num_frames": "7", "stride": None}, "frames")
            == synth._recipe({**base, "num_frames": "7-7", "stride": 7}, "frames"))
    assert (synth._recipe({**base, "num_frames": "5-13", "stride": None}, "frames")
            != synth._recipe({**base, "num_frames": "5-13", "stride": 5}, "frames"))
    with pytest.raises(ValueError, match="--num-frames must be N or LO-HI"):
        synth._parse_num_frames("9-3")


def test_motion_mode_writes_ordered_moments_and_resumes(tmp_path, two_faces):
    from PIL import Image

    out = tmp_path / "out"
    common = ["--input", two_faces, "--output", out, "--mode", "motion", "--num-frames", "3-5",
              "--seed", "7", "--cache-dir", tmp_path / "cache"]
    assert run_synth([*common, "--limit", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (record,) = manifest["items"]
    n = record["num_moments"]
    assert 3 <= n <= 5 and record["u"] == pytest.approx([i / n for i in range(n)])
    assert record["size"] == [112, 112]       # the 128 px faces, cropped with room for motion
    moments = [np.asarray(Image.open(out / f)) for f in record["files"]["sharp"]]
    blurry = np.asarray(Image.open(out / record["files"]["blurry"]))
    assert blurry.shape == moments[0].shape == (112, 112, 3)
    # the moments differ: the face moved
    assert np.abs(moments[0].astype(int) - moments[-1]).mean() > 1
    first_bytes = (out / record["files"]["blurry"]).read_bytes()

    # resumable: the first item is kept, the second made; the same seed gives the same item
    assert run_synth(common) == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts == {"items": 2, "made": 1, "already_done": 1, "skipped": 0, "failed": 0}
    again = tmp_path / "again"
    assert run_synth([*common[:3], again, *common[4:], "--limit", "1"]) == 0
    assert (again / record["files"]["blurry"]).read_bytes() == first_bytes
    with pytest.raises(ValueError, match="--num-frames was '3-5', now '3-6'"):
        run_synth([*common[:-2], "--num-frames", "3-6", *common[-2:]])


def test_a_missing_input_makes_no_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_synth(["--input", str(tmp_path / "missing"), "--output", str(out),
                      "--mode", "kernel"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
