"""The shared trainer's handling of user input: config override keys, run folders, resuming a
finished run, unreadable checkpoints and unusable images in a face folder.

Training runs use the tiny CFMD-GAN of ``tests/configs/cfmd_tiny.yaml`` for two or three steps.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

import facedeblur_ext
from facedeblur_ext.training import load_config
from facedeblur_ext.training.checkpoint import load_checkpoint
from facedeblur_ext.training.face_data import split_image_folder
from facedeblur_ext.training.trainer import Trainer

FRAMES = REPO_ROOT / "tests" / "data" / "frames_vd001"
FACES = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
TINY_CONFIG = REPO_ROOT / "tests" / "configs" / "cfmd_tiny.yaml"
BACKEND_NAME = ("facedeblur_ext.ops" if hasattr(facedeblur_ext.ops, "modulated_deform_conv2d")
                else "facedeblur_ref")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(output_dir, *overrides):
    return load_config("cfmd", TINY_CONFIG, [
        f"data.train.args.roots=[{FRAMES}]", f"data.val.args.roots=[{FRAMES}]",
        f"output_dir={output_dir}", f"model.backend={BACKEND_NAME}", *overrides])


def csv_steps(path) -> list[int]:
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(("override", "suggestion"), [
    ("train.max_step=2", "train.max_steps"),
    ("val.every_step=5", "val.every_steps"),
    ("optim.cosine_step=10", "optim.cosine_steps"),
    ("seeed=1", "seed"),
    ("data.val_cont=3", "data.val_count"),
    ("train.ema={enabled: true, decy: 0.9}", "train.ema.decay"),  # inside a new value
])
def test_an_override_adding_an_unknown_trainer_key_is_refused(override, suggestion):
    with pytest.raises(ValueError, match=f"did you mean {suggestion}\\?"):
        load_config("cfmd", None, [override])


def test_an_override_value_yaml_cannot_parse_is_a_string_unless_it_opens_yaml(cli_error,
                                                                               capsys):
    config = load_config("cfmd", None, ["data.pattern=*.jpg", "data.root=@faces", "seed= 3"])
    assert config["data"]["pattern"] == "*.jpg" and config["data"]["root"] == "@faces"
    assert config["seed"] == 3
    from facedeblur_ext import cli

    assert cli.main(["train", "cfmd", "data.pattern=*.jpg", "--print-config"]) == 0
    assert "pattern: '*.jpg'" in capsys.readouterr().out
    for value in ("[1, 2", "{enabled: true", '"unclosed'):
        message = cli_error(["train", "cfmd", f"train.ema={value}", "--print-config"])
        assert message.startswith(f"override 'train.ema={value}': the value is not valid YAML")


def test_a_config_file_with_a_yaml_error_is_one_line_naming_it(tmp_path, cli_error):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: [2\n")
    message = cli_error(["train", "cfmd", "--config", bad, "--print-config"])
    assert message.startswith(f"{bad} is not valid YAML: ") and "(line 3, column 1)" in message


def test_a_stage_override_is_checked_like_the_top_level_table():
    with pytest.raises(ValueError, match="did you mean stages.deblur.train.max_steps"):
        load_config("snadnet", None, ["stages.deblur.train.max_stepz=3"])


def test_overrides_may_set_keys_the_config_files_leave_out():
    """Trainer keys absent from the YAML defaults, and free tables (model, loss, class args)."""
    config = load_config("snadnet", None, [
        "train.max_steps=7", "optim.cosine_steps=8", "optim.min_lr_ratio=0.1",
        "optim.per_model={generator: {lr: 1e-3}}", "stages.deblur.train.max_steps=9",
        "data.train.args.min_size=48", "data.blur.args.config.motion_length=[3, 9]",
        "model.generator.new_argument=1", "loss.focal_gamma=1.5"])
    assert config["train"]["max_steps"] == 7 and config["optim"]["min_lr_ratio"] == 0.1
    assert config["stages"]["deblur"]["train"]["max_steps"] == 9
    assert config["data"]["train"]["args"]["min_size"] == 48
    assert config["model"]["generator"]["new_argument"] == 1


# ----------------------------------------------------------------------------- run folders


def test_a_fresh_start_in_an_earlier_run_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    first = ["train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    Trainer(tiny_config(run, *first)).fit()
    before = {p.name: p.read_bytes() for p in [run / "train.csv", run / "val.csv",
                                               *(run / "checkpoints").iterdir()]}
    with pytest.raises(FileExistsError, match="--resume auto.*-o DIR.*--overwrite"):
        Trainer(tiny_config(run, "train.max_steps=2")).fit()
    # Nothing of the earlier run was touched.
    after = {p.name: p.read_bytes() for p in [run / "train.csv", run / "val.csv",
                                              *(run / "checkpoints").iterdir()]}
    assert after == before

    # Logs without a checkpoint (a run killed before its first one) are a run as well.
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileExistsError, match="holds a training run") as info:
        Trainer(tiny_config(run, "train.max_steps=2"), resume="auto").fit()
    assert "--resume" not in str(info.value)  # nothing to resume from


def test_overwrite_deletes_the_earlier_runs_checkpoints_and_logs(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(run, "train.max_steps=3", "train.checkpoint_every=1",
                        "val.at_end=false")).fit()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == [
        "step_00000001.pt", "step_00000002.pt", "step_00000003.pt"]
    Trainer(tiny_config(run, "train.max_steps=1", "train.checkpoint_every=1",
                        "train.keep_checkpoints=2", "val.at_end=false"), overwrite=True).fit()
    # Only the new run's checkpoints: the old step 2 and 3 files would have outlived pruning.
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_00000001.pt"]
    assert csv_steps(run / "train.csv") == [1]


def test_an_output_dir_that_is_a_file_is_refused_before_training(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file"):
        Trainer(tiny_config(path, "train.max_steps=1")).fit()


# ----------------------------------------------------------------------------- resume


def test_resuming_a_finished_run_does_not_validate_it_again(tmp_path):
    run = tmp_path / "run"
    result = Trainer(tiny_config(run, "train.max_steps=2")).fit()
    assert result["step"] == 2 and result["last_val"] is not None
    assert csv_steps(run / "val.csv") == [2]
    again = Trainer(tiny_config(run, "train.max_steps=2"), resume="auto").fit()
    assert again["step"] == 2 and again["last_val"] is None
    assert csv_steps(run / "val.csv") == [2]
    assert csv_steps(run / "train.csv") == [1, 2]


# ----------------------------------------------------------------------------- checkpoints


def test_an_unreadable_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    Trainer(tiny_config(tmp_path / "run", "train.max_steps=1", "val.at_end=false")).fit()
    good = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    for name, content in (("empty.pt", b""), ("truncated.pt", good[:200]),
                          ("text.pt", b"not a checkpoint at all\n")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a readable checkpoint"):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- face folders


def test_unusable_images_are_dropped_before_the_validation_faces_are_held_out(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    good = sorted(FACES.glob("celeba_*.png"))[:4]
    for path in good:
        shutil.copy(path, faces / path.name)
    # Unusable files sorting after the good ones: they were the held-out validation faces.
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(faces / "zz_gray.png")
    (faces / "zz_text.png").write_text("not an image")
    with pytest.warns(UserWarning, match="skipping 2 of 6 images"):
        train, val = split_image_folder({"root": str(faces), "val_count": 2})
    assert [p.name for p in train] == [p.name for p in good[:2]]
    assert [p.name for p in val] == [p.name for p in good[2:]]

    for path in good:
        (faces / path.name).unlink()
    with pytest.raises(ValueError, match="no usable images in .*zz_gray.png: grayscale"):
        split_image_folder({"root": str(faces), "val_count": 0})
