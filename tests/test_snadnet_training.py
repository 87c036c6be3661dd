"""SNADNet through the shared trainer and the CLI: both stages on the bundled faces (tiny
config), stage-I mIoU, exact resume, ``facedeblur deblur --model snadnet``.

Region masks and parsing labels come from the data pipeline (MediaPipe, cached in a temporary
folder), the blur from ``facedeblur_ext.nn.BlurSynthesizer`` (short motion kernels). The
separable norm runs on the fused op where it is registered, else on the reference composition.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT
from PIL import Image
from torch.utils.data import DataLoader

import facedeblur_ext
from facedeblur_ext import cli
from facedeblur_ext.models.face_parsing import evaluate_parsing
from facedeblur_ext.models.snadnet import build_parser, load_snadnet
from facedeblur_ext.nn import resolve_backend
from facedeblur_ext.training import instantiate, load_config
from facedeblur_ext.training.checkpoint import load_checkpoint
from facedeblur_ext.training.snadnet_task import SNADNetTask, stage_config

pytest.importorskip("mediapipe")  # region masks and parsing labels of the data pipeline

FACES = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
TINY_CONFIG = REPO_ROOT / "tests" / "configs" / "snadnet_tiny.yaml"
BACKEND = ("facedeblur_ext.ops" if hasattr(facedeblur_ext.ops, "separable_norm")
           else "facedeblur_ref")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("face_cache")


def train_argv(run_dir, cache_dir, *overrides) -> list[str]:
    return ["train", "snadnet", "--config", str(TINY_CONFIG), "-o", str(run_dir),
            "--data-root", str(FACES), f"data.analyzer.cache_dir={cache_dir}",
            f"model.backend={BACKEND}", *overrides]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """Both stages through the CLI: 6 training faces, batch 2, one epoch (3 steps) each."""
    run_dir = tmp_path_factory.mktemp("snadnet_run")
    threads = torch.get_num_threads()
    try:
        assert cli.main(train_argv(run_dir, cache_dir)) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


def read_csv(path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


# ----------------------------------------------------------------------------- both stages


def test_cli_trains_both_stages(trained):
    for stage in ("parsing", "deblur"):
        folder = trained / stage
        assert load_checkpoint(folder / "checkpoints" / "last.pt")["step"] == 3
        assert [int(r["step"]) for r in read_csv(folder / "train.csv")] == [1, 2, 3]
        assert (folder / "samples" / "step_00000003.png").exists()
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["stage"] == stage and config["output_dir"] == str(folder)

    stage1 = read_csv(trained / "parsing" / "train.csv")
    assert all(np.isfinite(float(r["focal"])) for r in stage1)
    (val1,) = read_csv(trained / "parsing" / "val.csv")
    assert "psnr" not in val1  # a parser restores no image
    for key in ("miou", "pixel_accuracy", "iou_skin", "iou_background"):
        assert key in val1
    assert 0.0 <= float(val1["miou"]) <= 1.0

    stage2 = read_csv(trained / "deblur" / "train.csv")
    for key in ("generator_total", "discriminator", "rec", "adv", "texture", "rec_skin"):
        assert all(np.isfinite(float(r[key])) for r in stage2), key
    (val2,) = read_csv(trained / "deblur" / "val.csv")
    assert 5.0 < float(val2["psnr"]) < 60.0 and 0.0 < float(val2["ssim"]) <= 1.0

    # Stage II took stage I's parser and kept it frozen; its optimizers are the paper's.
    ckpt1 = load_checkpoint(trained / "parsing" / "checkpoints" / "last.pt")
    ckpt2 = load_checkpoint(trained / "deblur" / "checkpoints" / "last.pt")
    assert ckpt2["config"]["model"]["parser_checkpoint"] == str(
        trained / "parsing" / "checkpoints" / "last.pt")
    generator_state = ckpt2["models"]["generator"]
    for name, value in ckpt1["models"]["parser"].items():
        assert torch.equal(generator_state[f"parser.{name}"], value), name
    sgd = ckpt1["optimizers"]["parser"]["param_groups"][0]
    assert (sgd["lr"], sgd["momentum"], sgd["weight_decay"]) == (0.02, 0.9, 5e-4)
    for name in ("generator", "discriminator"):
        adam = ckpt2["optimizers"][name]["param_groups"][0]
        assert (adam["lr"], tuple(adam["betas"])) == (2e-4, (0.5, 0.999))


def test_stage1_validation_reports_the_miou_of_the_held_out_faces(trained):
    ckpt = load_checkpoint(trained / "parsing" / "checkpoints" / "last.pt")
    config = ckpt["config"]
    parser = build_parser(config["model"])
    parser.load_state_dict(ckpt["models"]["parser"])
    _, val_set = SNADNetTask(config, torch.device("cpu")).build_datasets()
    # The last 2 of the 8 bundled CelebA faces, held out of training.
    assert [p.name for p in val_set.files] == ["celeba_201427.png", "celeba_201428.png"]
    expected = evaluate_parsing(parser, DataLoader(val_set, batch_size=2))
    (logged,) = read_csv(trained / "parsing" / "val.csv")
    assert float(logged["miou"]) == pytest.approx(expected["miou"], rel=1e-4)
    assert float(logged["pixel_accuracy"]) == pytest.approx(expected["pixel_accuracy"], rel=1e-4)


# ----------------------------------------------------------------------------- resume


def _final_state(run_dir) -> dict:
    ckpt = load_checkpoint(run_dir / "deblur" / "checkpoints" / "last.pt")
    return {k: ckpt[k] for k in ("models", "ema", "optimizers", "schedulers", "step", "epoch",
                                 "epoch_step")}


def _assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_stage2_resume_is_exact(trained, tmp_path, cache_dir):
    """k steps + resume + k steps == 2k steps, bit for bit (3 batches per epoch: the resume
    is mid-epoch and the run crosses an epoch)."""
    k = 2
    common = ["stage=deblur", "stages.deblur.train.epochs=5", "train.ema.enabled=true",
              "train.ema.decay=0.9", "val.at_end=false",
              f"model.parser_checkpoint={trained / 'parsing' / 'checkpoints' / 'last.pt'}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main(train_argv(straight, cache_dir, *common, f"train.max_steps={2 * k}")) == 0
    assert cli.main(train_argv(split, cache_dir, *common, f"train.max_steps={k}")) == 0
    assert _final_state(split)["epoch_step"] == k
    assert cli.main(train_argv(split, cache_dir, *common, f"train.max_steps={2 * k}",
                               "--resume", "auto")) == 0
    _assert_same(_final_state(straight), _final_state(split))
    assert _final_state(split)["step"] == 2 * k and _final_state(split)["epoch"] == 1
    logged = read_csv(split / "deblur" / "train.csv")
    assert [int(r["step"]) for r in logged] == list(range(1, 2 * k + 1))
    untimed = [{k: v for k, v in r.items() if k != "sec_per_step"} for r in logged]
    assert untimed == [{k: v for k, v in r.items() if k != "sec_per_step"}
                       for r in read_csv(straight / "deblur" / "train.csv")]


def test_runs_split_the_stages_and_route_resume(tmp_path):
    config = load_config("snadnet", TINY_CONFIG, [f"output_dir={tmp_path}",
                                                  "train.max_steps=7",
                                                  "stages.deblur.train.max_steps=9"])
    (first, r1), (second, r2) = SNADNetTask.runs(config, "auto")
    assert (first["stage"], second["stage"]) == ("parsing", "deblur") and r1 == r2 == "auto"
    assert first["output_dir"] == str(tmp_path / "parsing")
    assert (first["train"]["max_steps"], second["train"]["max_steps"]) == (7, 9)
    assert second["model"]["parser_checkpoint"] == str(tmp_path / "parsing" / "checkpoints" /
                                                       "last.pt")
    assert "stages" not in first and first["task"] == "snadnet"

    with pytest.raises(FileNotFoundError, match="parser_checkpoint"):
        SNADNetTask(stage_config(config, "deblur"), torch.device("cpu")).build_models()

    # --resume auto skips a stage whose checkpoint is complete (here: 7 steps of stage I).
    (tmp_path / "parsing" / "checkpoints").mkdir(parents=True)
    for step, runs in ((6, 2), (7, 1)):
        torch.save({"task": "snadnet", "step": step, "epoch": 0},
                   tmp_path / "parsing" / "checkpoints" / "last.pt")
        assert len(SNADNetTask.runs(config, "auto")) == runs
    assert SNADNetTask.runs(config, "auto")[0][0]["stage"] == "deblur"
    assert len(SNADNetTask.runs(config, None)) == 2  # a fresh start retrains both

    # An explicit checkpoint resumes the stage that wrote it; earlier stages count as done.
    ckpt = tmp_path / "deblur.pt"
    torch.save({"task": "snadnet", "config": {"stage": "deblur"}}, ckpt)
    ((only, resume),) = SNADNetTask.runs(config, str(ckpt))
    assert only["stage"] == "deblur" and resume == str(ckpt)
    torch.save({"task": "snadnet", "config": {"stage": "parsing"}}, ckpt)
    (_, r1), (_, r2) = SNADNetTask.runs(config, str(ckpt))
    assert (r1, r2) == (str(ckpt), None)
    with pytest.raises(ValueError, match="stage"):
        SNADNetTask.runs({**config, "stage": "deblur"}, str(ckpt))
    with pytest.raises(ValueError, match="stage must be"):
        SNADNetTask.runs({**config, "stage": "all"})
    with pytest.raises(ValueError, match="needs stage"):
        SNADNetTask(config, torch.device("cpu"))  # 'both' is two runs, not one task


def test_data_root_option_needs_a_task_with_data_root(capsys, cli_error):
    err = cli_error(["train", "cfmd", "--data-root", "faces", "--print-config"])
    assert "no data.root" in err
    assert cli.main(["train", "snadnet", "--data-root", "some/faces:dir #1",
                     "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["root"] == "some/faces:dir #1"


@pytest.mark.slow
def test_ddp_gloo_two_processes_train_both_stages_with_identical_replicas(tmp_path, cache_dir):
    """Under DDP the frozen parser inside SNADNet and the batch-norm layers must not make the
    replicas drift: parameters are compared across ranks after every step of both stages."""
    paths = [str(REPO_ROOT), str(REPO_ROOT / "python"), str(REPO_ROOT / "tests")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "facedeblur_ext", *train_argv(tmp_path, cache_dir),
           "distributed.check_replicas_every=1", "train.ema.enabled=true",
           "stages.deblur.train.batch_size=1", "val.at_end=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 6 faces over 2 ranks: 1 step of 2 per rank in stage I, 3 steps of 1 in stage II.
    for stage, steps in (("parsing", 1), ("deblur", 3)):
        rows = read_csv(tmp_path / stage / "train.csv")
        assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
        assert all(float(r["replica_mismatch"]) == 0 for r in rows)
        ckpt = load_checkpoint(tmp_path / stage / "checkpoints" / "last.pt")
        assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == steps


# ----------------------------------------------------------------------------- deblur


def test_deblur_cli_restores_an_image_and_a_folder(trained, tmp_path, capsys):
    ckpt = trained / "deblur" / "checkpoints" / "last.pt"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    # A real motion-blurred face at an odd size (padded for the networks, cropped back) and a
    # CelebA face.
    Image.open(FACES / "realblur_shen_1.png").convert("RGB").resize((75, 61)).save(
        inputs / "real.png")
    Image.open(FACES / "celeba_201428.png").convert("RGB").save(inputs / "celeba.png")
    common = ["deblur", "--model", "snadnet", "--checkpoint", str(ckpt), "--backend", BACKEND,
              "--device", "cpu"]
    out = tmp_path / "out"
    assert cli.main([*common, "--save-parsing", str(inputs), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "celeba.png", "celeba_parsing.png", "real.png", "real_parsing.png"]
    assert Image.open(out / "real.png").size == (75, 61)
    assert Image.open(out / "real_parsing.png").size == (75, 61)

    single = tmp_path / "single"
    assert cli.main([*common, str(inputs / "real.png"), "-o", str(single)]) == 0
    assert [p.name for p in single.iterdir()] == ["real.png"]
    restored = np.asarray(Image.open(single / "real.png"))
    np.testing.assert_array_equal(restored, np.asarray(Image.open(out / "real.png")))
    # ... and it is what the model in the checkpoint computes.
    model = load_snadnet(ckpt, backend=resolve_backend(BACKEND))
    x = torch.from_numpy(np.asarray(Image.open(inputs / "real.png"), dtype=np.float32) / 255)
    expected = model.restore(x.permute(2, 0, 1)[None])[0].mul(255).round().byte()
    np.testing.assert_array_equal(restored, expected.permute(1, 2, 0).numpy())
    assert not np.array_equal(restored, np.asarray(Image.open(inputs / "real.png")))

    capsys.readouterr()
    # into a fresh folder: a rerun into `single` skips its finished output before any model loads
    assert cli.main([*common[:3], "--checkpoint", str(trained / "parsing" / "checkpoints" /
                                                      "last.pt"),
                     str(inputs / "real.png"), "-o", str(tmp_path / "stage1")]) == 2  # user error
    assert "stage-II checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- blur, CUDA


def test_packaged_config_blur_is_the_blur_synthesizer():
    from facedeblur_ext.data import run_synthesizer

    spec = load_config("snadnet")["data"]["blur"]
    synthesizer = instantiate(spec)
    assert type(synthesizer).__name__ == "BlurSynthesizer"
    sharp = torch.from_numpy(np.asarray(Image.open(FACES / "celeba_201418.png").convert("RGB"),
                                        dtype=np.float32) / 255).permute(2, 0, 1)[None]
    first, info = run_synthesizer(synthesizer, sharp, None, seed=3, return_info=True)
    again, _ = run_synthesizer(synthesizer, sharp, None, seed=3)
    assert first.shape == sharp.shape and torch.equal(first, again)
    assert not torch.allclose(first, sharp, atol=0.02)
    assert info is not None


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_trains_both_stages(tmp_path, cache_dir, amp):
    argv = train_argv(tmp_path, cache_dir, "device=cuda", f"train.amp={amp}")
    assert cli.main(argv) == 0
    (val,) = read_csv(tmp_path / "deblur" / "val.csv")
    assert np.isfinite(float(val["psnr"]))
    (val,) = read_csv(tmp_path / "parsing" / "val.csv")
    assert 0.0 <= float(val["miou"]) <= 1.0
