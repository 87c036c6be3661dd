"""The ``facedeblur`` command line: user errors, ``train -o`` and run folders, ``export``.

Training runs use the tiny CFMD-GAN of ``tests/configs/cfmd_tiny.yaml`` for one to three steps.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO_ROOT

import facedeblur_ext
from facedeblur_ext import cli
from facedeblur_ext.training.checkpoint import load_checkpoint

FRAMES = REPO_ROOT / "tests" / "data" / "frames_vd001"
TINY_CONFIG = REPO_ROOT / "tests" / "configs" / "cfmd_tiny.yaml"
BACKEND_NAME = ("facedeblur_ext.ops" if hasattr(facedeblur_ext.ops, "modulated_deform_conv2d")
                else "facedeblur_ref")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_argv(run_dir, *extra) -> list[str]:
    return ["train", "cfmd", "--config", str(TINY_CONFIG), "-o", str(run_dir),
            f"data.train.args.roots=[{FRAMES}]", f"data.val.args.roots=[{FRAMES}]",
            f"model.backend={BACKEND_NAME}", *extra]


# ----------------------------------------------------------------------------- user errors


def test_a_user_error_is_one_line_with_exit_status_2(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["train", "nosuchtask"]) == 2
    err = capsys.readouterr().err
    assert err == ("facedeblur train: error: unknown task 'nosuchtask'; known: baseline_ae, "
                   "baseline_gan, cfmd, snadnet\n")
    assert cli.main(["train", "cfmd", "train.max_step=2", "--print-config"]) == 2
    assert "did you mean train.max_steps?" in capsys.readouterr().err

    monkeypatch.setenv(cli.DEBUG_ENV, "1")  # the traceback, for bug reports
    with pytest.raises(KeyError, match="unknown task"):
        cli.main(["train", "nosuchtask"])


def test_errors_that_may_be_bugs_say_how_to_get_the_traceback(capsys, monkeypatch):
    import facedeblur_ext.commands.info as info

    def broken_run(args):
        raise RuntimeError("the model broke")

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(info, "run", broken_run)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == ("facedeblur info: error: the model broke "
                                       f"(set {cli.DEBUG_ENV}=1 for the traceback)\n")


def test_messages_without_words_name_their_exception():
    assert cli.describe_error(EOFError()) == "EOFError"
    assert cli.describe_error(KeyError("train")) == "KeyError: train"
    assert cli.describe_error(KeyError("no task 'x'")) == "no task 'x'"  # no repr quotes
    assert cli.describe_error(RuntimeError("first line\nsecond")) == "first line"


def test_missing_and_truncated_checkpoints_are_user_errors(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert cli.main(train_argv(tmp_path / "run", "--resume", str(missing))) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert cli.main(["export", str(empty), str(tmp_path / "small.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"facedeblur export: error: {empty} is not a readable checkpoint")
    assert "Traceback" not in err


def test_help_names_the_debug_variable(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "FACEDEBLUR_DEBUG=1" in capsys.readouterr().out


# ----------------------------------------------------------------------------- train


@pytest.mark.parametrize("folder", ["2024-01-01", "001", "exp #2", "runs/a: b"])
def test_output_dir_is_a_plain_path(folder, capsys):
    assert cli.main(["train", "cfmd", "-o", folder, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == folder


def test_train_refuses_an_earlier_run_folder_unless_resumed_or_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(train_argv(run, "train.max_steps=2", "train.checkpoint_every=1")) == 0
    capsys.readouterr()
    assert cli.main(train_argv(run, "train.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--overwrite" in err
    assert cli.main(train_argv(run, "train.max_steps=3", "--resume", "auto")) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    assert cli.main(train_argv(run, "train.max_steps=1", "--overwrite")) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1
    assert not list((run / "checkpoints").glob("step_*.pt"))
    assert [line.split(",")[0] for line in (run / "val.csv").read_text().splitlines()] == [
        "step", "1"]
    with pytest.raises(SystemExit):  # argparse: the two exclude each other
        cli.main(train_argv(run, "--resume", "auto", "--overwrite"))


# ----------------------------------------------------------------------------- export


def test_export_never_writes_over_its_checkpoint_and_asks_before_replacing(tmp_path, cli_error):
    ckpt = tmp_path / "last.pt"
    torch.save({"task": "cfmd", "config": {}, "models": {"generator": {
        "weight": torch.randn(3, 3)}}}, ckpt)
    original = ckpt.read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(ckpt)
    for output in (ckpt, tmp_path / "." / "last.pt", link):
        err = cli_error(["export", str(ckpt), str(output), "--force"])
        assert "is the checkpoint itself" in err
    assert ckpt.read_bytes() == original

    small = tmp_path / "small.pt"
    small.write_bytes(b"someone's file")
    err = cli_error(["export", str(ckpt), str(small)])
    assert "exists; pass --force" in err
    assert small.read_bytes() == b"someone's file"
    assert cli.main(["export", str(ckpt), str(small), "--force"]) == 0
    assert load_checkpoint(small)["models"]["generator"]["weight"].dtype == torch.float16


def test_info_lists_the_registered_ops_and_nothing_else(capsys):
    from facedeblur_ext.commands import info

    ops = info.collect()["ops"]
    # The namespace object's own attributes (``name``) are not ops.
    assert "name" not in ops
    assert ops == sorted(["average_frames", "average_frames_backward", "blur_synthesize",
                          "blur_synthesize_backward", "defocus_kernels", "gaussian_kernels",
                          "modulated_deform_conv2d", "modulated_deform_conv2d_backward",
                          "motion_kernels", "separable_norm_backward", "separable_norm_forward",
                          "trajectory_kernels"])
    assert cli.main(["info"]) == 0
    assert "ops (12): average_frames," in capsys.readouterr().out


def test_export_copies_the_inference_table_and_checks_it(tmp_path, cli_error):
    from facedeblur_ext.inference import InferenceSettings, read_inference_settings

    def training_checkpoint(name, inference):
        path = tmp_path / name
        config = {} if inference is None else {"inference": inference}
        torch.save({"task": "cfmd", "config": config,
                    "models": {"generator": {"weight": torch.randn(2)}}}, path)
        return path

    moments = training_checkpoint("moments.pt", {"moments": True, "u_range": [0.0, 0.875]})
    assert cli.main(["export", str(moments), str(tmp_path / "m.pt")]) == 0
    assert load_checkpoint(tmp_path / "m.pt")["inference"] == {"moments": True,
                                                               "u_range": [0.0, 0.875]}
    assert read_inference_settings(tmp_path / "m.pt") == InferenceSettings(True, (0.0, 0.875))

    still = training_checkpoint("still.pt", None)  # no table: one moment at u = 0.5
    assert cli.main(["export", str(still), str(tmp_path / "s.pt")]) == 0
    assert "inference" not in load_checkpoint(tmp_path / "s.pt")
    assert read_inference_settings(tmp_path / "s.pt") == InferenceSettings(False, (0.5, 0.5))

    bad = training_checkpoint("bad.pt", {"moments": True, "u_range": [0.9, 0.1]})
    assert "0 <= u_min <= u_max <= 1" in cli_error(["export", str(bad), str(tmp_path / "b.pt")])
    assert not (tmp_path / "b.pt").exists()


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    import facedeblur_ext.commands.info as info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "facedeblur info: interrupted\n"
