"""Faults: one writer per folder, killed writers (SIGKILL at random points and inside checkpoint
writes), full disks, DDP exits and orphaned torchrun workers.

Training runs use the tiny CFMD-GAN of ``tests/configs/cfmd_tiny.yaml``; the ``slow`` tests
start subprocesses (the CLI, torchrun) and take 2-3 minutes together on a 2-core machine.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from test_training import BACKEND_NAME, FRAMES, TINY_CONFIG, csv_steps, tiny_config

from facedeblur_ext.data import io as data_io
from facedeblur_ext.training.checkpoint import load_checkpoint
from facedeblur_ext.training.lock import LOCK_NAME, FolderLock, FolderLockedError
from facedeblur_ext.training.trainer import Trainer

FACES = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_argv(run, *overrides) -> list[str]:
    """``facedeblur train`` arguments of the tiny config (one torch thread per process)."""
    return ["train", "cfmd", "--config", str(TINY_CONFIG), "-o", str(run),
            f"data.train.args.roots=[{FRAMES}]", f"data.val.args.roots=[{FRAMES}]",
            f"model.backend={BACKEND_NAME}", "train.num_threads=1", *overrides]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FACEDEBLUR_DEBUG", None)
    return env


def leftover_temp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_checkpoint(a), load_checkpoint(b)
    assert first["step"] == second["step"]
    return all(torch.equal(t, second["models"][name][key])
               for name, weights in first["models"].items() for key, t in weights.items())


# ----------------------------------------------------------------------------- one writer

#: Holds a folder's lock until killed (a stand-in for any writer).
HOLDER = ("import sys, time\n"
          "from facedeblur_ext.training.lock import FolderLock\n"
          "FolderLock(sys.argv[1], 'facedeblur train').acquire()\n"
          "print('locked', flush=True)\n"
          "time.sleep(300)\n")


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_it(
        tmp_path, cli_error):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = cli_error(train_argv(run, "train.max_steps=1"))
        assert message.startswith(f"{run} is in use by facedeblur train (PID {holder.pid})")
        message = cli_error(train_argv(run, "train.max_steps=1", "--resume", "auto"))
        assert f"(PID {holder.pid})" in message
        message = cli_error(["synth", "--input", FACES, "--output", run, "--mode", "kernel"])
        assert f"(PID {holder.pid})" in message
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, nothing to clean up
        holder.wait()
    with FolderLock(run, "test"):
        pass


def test_a_second_trainer_into_a_folder_being_trained_is_refused(tmp_path):
    run = tmp_path / "run"
    refusals = []

    def start_another(trainer):
        if trainer.step == 1:
            with pytest.raises(FolderLockedError, match=f"PID {os.getpid()}") as info:
                Trainer(tiny_config(run, "train.max_steps=1"), resume="auto").fit()
            refusals.append(str(info.value))

    result = Trainer(tiny_config(run, "train.max_steps=2", "val.at_end=false"),
                     step_callback=start_another).fit()
    assert result["step"] == 2 and len(refusals) == 1
    assert csv_steps(run / "train.csv") == [1, 2]  # the refused one wrote nothing
    Trainer(tiny_config(run, "train.max_steps=3", "val.at_end=false"), resume="auto").fit()
    assert csv_steps(run / "train.csv") == [1, 2, 3]  # released at the end of fit


def test_a_file_system_without_locks_is_written_with_a_warning(tmp_path, monkeypatch):
    from facedeblur_ext.training import lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock files"), FolderLock(tmp_path, "test"):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()} test\n"


# ----------------------------------------------------------------------------- temp files


def test_a_resume_removes_torn_temp_files_and_promotes_a_complete_unrenamed_checkpoint(
        tmp_path, capsys):
    run = tmp_path / "run"
    overrides = ["train.checkpoint_every=1", "train.keep_checkpoints=3", "val.at_end=false"]
    Trainer(tiny_config(run, "train.max_steps=3", *overrides)).fit()
    ckpt = run / "checkpoints"
    complete = (ckpt / "step_00000003.pt").read_bytes()
    # As if killed in the step-3 save: last.pt still step 2, the new one complete in its
    # temporary file; and torn files of other kills.
    shutil.copy(ckpt / "step_00000002.pt", ckpt / "last.pt")
    (ckpt / "step_00000003.pt").unlink()
    (ckpt / ".last.pt.k3x9a_2b.tmp").write_bytes(complete)
    (ckpt / ".last.pt.0000torn.tmp").write_bytes(complete[: len(complete) // 2])
    (ckpt / ".step_00000004.pt.emptyabc.tmp").write_bytes(b"")
    (run / "train.csv.tmp").write_text("step\n")
    capsys.readouterr()
    result = Trainer(tiny_config(run, "train.max_steps=4", *overrides), resume="auto").fit()
    err = capsys.readouterr()
    assert "[resume]" in err.out and "step 3," in err.out  # resumed from the promoted file
    assert ".last.pt.k3x9a_2b.tmp: a complete checkpoint (step 3)" in err.err
    assert result["step"] == 4 and csv_steps(run / "train.csv") == [1, 2, 3, 4]
    assert leftover_temp_files(run) == []

    # An older complete temporary file never replaces a newer checkpoint.
    (ckpt / ".last.pt.olderabc.tmp").write_bytes(complete)
    Trainer(tiny_config(run, "train.max_steps=4", *overrides), resume="auto").fit()
    assert load_checkpoint(ckpt / "last.pt")["step"] == 4
    assert leftover_temp_files(run) == []


def test_synth_removes_the_temp_files_of_a_killed_run(tmp_path):
    from test_synth_cli import run_synth

    faces = tmp_path / "in"
    faces.mkdir()
    shutil.copy(FACES / "celeba_201418.png", faces)
    out = tmp_path / "out"
    argv = ["--input", faces, "--output", out, "--mode", "kernel", "--size", "64",
            "--cache-dir", tmp_path / "cache"]
    for folder in ("records", "blurry"):
        (out / folder).mkdir(parents=True)
    (out / "records" / ".celeba_201418.json.abcd1234.tmp").write_text('{"name": ')
    (out / "blurry" / ".celeba_201418.png.ab_d1234.tmp").write_bytes(b"\x89PNG")
    (out / ".manifest.json.zzzz9999.tmp").write_text("")
    assert run_synth(argv) == 0
    assert leftover_temp_files(out) == []
    assert (out / "records" / "celeba_201418.json").is_file()


# ----------------------------------------------------------------------------- killed runs

#: Runs the CLI (argv[3:]) and SIGKILLs itself inside the checkpoint save of step argv[2]:
#: "torn" after writing half of the temporary file, "unrenamed" after writing all of it,
#: before the rename.
KILLED_IN_SAVE = r"""
import io, os, signal, sys
import torch
mode, kill_step = sys.argv[1], int(sys.argv[2])
real_save, real_replace = torch.save, os.replace
saving = {}

def save(obj, fh, *args, **kwargs):
    saving["step"] = obj.get("step") if isinstance(obj, dict) else None
    if mode == "torn" and saving["step"] == kill_step:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, fh, *args, **kwargs)

def replace(src, dst, *args, **kwargs):
    if mode == "unrenamed" and saving.get("step") == kill_step and str(dst).endswith("last.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

torch.save, os.replace = save, replace
from facedeblur_ext.cli import main
sys.exit(main(sys.argv[3:]))
"""


def logged_steps(run: Path) -> int:
    try:
        return max(csv_steps(run / "train.csv"), default=0)
    except (OSError, ValueError, IndexError):  # not written yet, or being rewritten
        return 0


@pytest.mark.slow
def test_sigkill_at_random_points_and_inside_checkpoint_writes_resumes_to_the_same_weights(
        tmp_path):
    steps = 10
    overrides = [f"train.max_steps={steps}", "train.checkpoint_every=1", "val.at_end=false"]
    reference = tmp_path / "reference"
    Trainer(tiny_config(reference, *overrides, "train.num_threads=1")).fit()

    run = tmp_path / "run"
    argv = train_argv(run, *overrides, "--resume", "auto")
    env = subprocess_env()
    # Deterministic kills inside the saves of steps 3 and 6.
    for mode, step in (("torn", 3), ("unrenamed", 6)):
        done = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, mode, str(step), *argv],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == step - 1
        assert list((run / "checkpoints").glob(".last.pt.*.tmp")), mode
    # SIGKILL at random points: a random time after a random number of further steps.
    rng = random.Random(19)
    kills = 0
    for _attempt in range(12):
        process = subprocess.Popen([sys.executable, "-m", "facedeblur_ext", *argv],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, env=env)
        target = min(steps, logged_steps(run) + rng.randint(1, 2))
        deadline = time.monotonic() + 240
        while (process.poll() is None and logged_steps(run) < target
               and time.monotonic() < deadline):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if kills < 3 and process.poll() is None:
            process.kill()
            kills += 1
        _, err = process.communicate(timeout=300)
        if _attempt == 0:  # it found the complete step-6 file of the "unrenamed" kill
            assert ".tmp: a complete checkpoint (step 6)" in err, err[-3000:]
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, err[-3000:]
    assert process.returncode == 0 and kills >= 1
    assert same_weights(run / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")
    assert csv_steps(run / "train.csv") == list(range(1, steps + 1))
    assert leftover_temp_files(run) == []


# ----------------------------------------------------------------------------- full disks


def full_disk_after(monkeypatch, failing) -> None:
    """Make ``data.io.atomic_write_bytes`` raise ENOSPC (as a full disk does, with no file name)
    for the paths where ``failing(path)`` is true."""
    real = data_io.atomic_write_bytes

    def write(path, data):
        if failing(Path(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(data_io, "atomic_write_bytes", write)


def test_synth_stops_at_a_full_disk_with_a_true_manifest_and_a_rerun_finishes(
        tmp_path, monkeypatch, cli_error):
    faces = tmp_path / "in"
    faces.mkdir()
    names = sorted(p.name for p in FACES.glob("celeba_*.png"))[:4]
    for name in names:
        shutil.copy(FACES / name, faces)
    out = tmp_path / "out"
    argv = ["synth", "--input", faces, "--output", out, "--mode", "kernel", "--size", "64",
            "--cache-dir", tmp_path / "cache", "--no-progress"]
    third = Path(names[2]).stem
    attempts = []
    full_disk_after(monkeypatch, lambda path: (third in path.name or attempts)
                    and path.name != "manifest.json" and not attempts.append(path))
    message = cli_error(argv)
    assert message.startswith(f"[Errno {errno.ENOSPC}] No space left on device (writing item "
                              f"{third} in {out})")
    assert "stopped after 2 new item(s), manifest.json lists the 2 items on disk" in message
    assert len(attempts) == 1  # the first failure stopped the run: item 4 was not tried
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(p.stem for p in (out / "records").glob("*.json"))
    assert sorted(item["name"] for item in manifest["items"]) == on_disk
    assert manifest["counts"]["items"] == 2 and manifest["counts"]["stopped"] == "disk full"
    assert leftover_temp_files(out) == []

    monkeypatch.undo()  # space freed
    from facedeblur_ext import cli

    assert cli.main([str(a) for a in argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["items"] == 4 and manifest["counts"]["already_done"] == 2
    assert manifest["counts"]["made"] == 2


def test_a_full_disk_in_a_checkpoint_save_names_the_file(tmp_path, monkeypatch, cli_error):
    real_save = torch.save

    class FullDisk:
        """A file whose disk fills after 1000 bytes."""

        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

        def flush(self):
            self.fh.flush()

    # torch.save reports the failed write as a RuntimeError raised while handling it.
    monkeypatch.setattr(torch, "save", lambda obj, fh, **kw: real_save(obj, FullDisk(fh), **kw))
    run = tmp_path / "run"
    message = cli_error(train_argv(run, "train.max_steps=1", "val.at_end=false"))
    assert message == (f"[Errno {errno.ENOSPC}] No space left on device (writing "
                       f"{run / 'checkpoints' / 'last.pt'})")
    assert leftover_temp_files(run) == []


def test_a_full_disk_in_a_log_write_names_the_run_folder(tmp_path, monkeypatch, cli_error):
    from facedeblur_ext.training.run_log import CSVLog

    def full(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(CSVLog, "write", full)
    run = tmp_path / "run"
    message = cli_error(train_argv(run, "train.max_steps=1"))
    assert message == f"[Errno {errno.ENOSPC}] No space left on device (writing {run})"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (a real full disk), where this process may mount one (root)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                              str(mount_point)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: the injected-ENOSPC tests cover full disks")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_real_full_disk_in_synth_and_training(small_tmpfs, tmp_path, cli_error):
    faces = tmp_path / "in"
    faces.mkdir()
    for path in sorted(FACES.glob("celeba_*.png")):
        shutil.copy(path, faces)
    out = small_tmpfs / "synth"
    argv = ["synth", "--input", faces, "--output", out, "--mode", "kernel", "--size", "128",
            "--cache-dir", tmp_path / "cache", "--no-progress"]
    message = cli_error(argv)
    assert "No space left on device (writing item" in message and str(out) in message
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["items"] == len(list((out / "records").glob("*.json")))
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    from facedeblur_ext import cli

    assert cli.main([str(a) for a in argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["items"] == len(list(faces.iterdir()))

    shutil.rmtree(out)
    subprocess.run(["mount", "-o", "remount,size=256k", str(small_tmpfs)], check=True)
    run = small_tmpfs / "run"  # a tiny CFMD checkpoint is about 2 MB
    message = cli_error(train_argv(run, "train.max_steps=1", "val.at_end=false"))
    assert message.endswith(f"No space left on device (writing {run / 'checkpoints' / 'last.pt'})")
    assert leftover_temp_files(run) == []


# ----------------------------------------------------------------------------- DDP


def torchrun_command(run, *overrides) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "facedeblur_ext",
            *train_argv(run, "distributed.backend=gloo", "distributed.check_replicas_every=1",
                        *overrides)]


@pytest.mark.slow
def test_two_gloo_ranks_finish_with_status_0_repeatedly(tmp_path):
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        done = subprocess.run(torchrun_command(run, "train.max_steps=3"), capture_output=True,
                              text=True, env=subprocess_env(), timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        assert "terminate called" not in output and "done: step 3" in output


@pytest.mark.slow
def test_a_torchrun_job_into_a_folder_in_use_is_refused_on_every_rank(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = subprocess.run(torchrun_command(run, "train.max_steps=1"), capture_output=True,
                              text=True, env=subprocess_env(), timeout=300)
    finally:
        holder.kill()
        holder.wait()
    refusals = [line for line in done.stderr.splitlines()
                if line.startswith(f"facedeblur train: error: {run} is in use by facedeblur "
                                   f"train (PID {holder.pid})")]
    # Rank 0 tried the lock and told rank 1: both stop with the same line (unless torchrun
    # ends rank 1 first), nothing waits for a rank that left.
    assert done.returncode == 1 and refusals, done.stderr[-4000:]
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]


#: Collectives, then exit without leaving the process group.
EXIT_AFTER_COLLECTIVES = """
import torch, torch.distributed as dist
from facedeblur_ext.training.distributed import init_distributed
info = init_distributed("cpu", "gloo")
tensors = [torch.empty(1) for _ in range(info.world_size)]
dist.all_gather(tensors, torch.tensor([float(info.rank)]))
ranks = [None] * info.world_size
dist.all_gather_object(ranks, info.rank)
assert ranks == list(range(info.world_size))
"""


@pytest.mark.slow
def test_a_group_left_for_the_interpreter_exit_does_not_abort(tmp_path):
    # Four gloo ranks that exit after collectives without destroy_process_group abort in most
    # runs ("terminate called without an active exception": 7 of 8 measured with torch 2.13,
    # 0 of 8 after a barrier and destroy_process_group); init_distributed's atexit hook leaves.
    script = tmp_path / "exit_after_collectives.py"
    script.write_text(EXIT_AFTER_COLLECTIVES)
    for _attempt in range(2):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=4", str(script)], capture_output=True,
                              text=True, env=subprocess_env(), timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 0 and "terminate called" not in output, output[-4000:]


@pytest.mark.slow
def test_an_error_on_one_rank_ends_both_in_one_line_without_an_abort(tmp_path):
    # A validation batch size of 0 fails on rank 0 only (it validates while rank 1 waits).
    done = subprocess.run(torchrun_command(tmp_path / "run", "train.max_steps=1",
                                           "val.batch_size=0"),
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    errors = [line for line in done.stderr.splitlines()
              if line.startswith("facedeblur train: error: ")]
    # (rank 1 reports the lost connection, unless torchrun's SIGTERM ends it first)
    assert done.returncode == 1 and errors, done.stderr[-4000:]
    assert any("batch_size should be a positive integer" in line for line in errors)
    assert "terminate called" not in done.stdout + done.stderr


def worker_pids(launcher_pid: int) -> list[int]:
    children = [int(pid) for task in Path(f"/proc/{launcher_pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return [pid for pid in children
            if b"facedeblur_ext" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_of_a_killed_torchrun_stop_and_hold_off_a_second_writer(tmp_path, cli_error):
    run = tmp_path / "run"
    log_path = tmp_path / "torchrun.log"
    with log_path.open("w") as log:
        launcher = subprocess.Popen(torchrun_command(run, "train.max_steps=100000"),
                                    stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
    workers = []
    try:
        deadline = time.monotonic() + 240
        while logged_steps(run) < 2:
            assert launcher.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no training step within 240 s"
            time.sleep(0.1)
        workers = worker_pids(launcher.pid)
        assert len(workers) == 2
        holder = int((run / LOCK_NAME).read_text().split()[0])
        assert holder in workers  # rank 0 holds the folder for the job

        message = cli_error(train_argv(run, "--resume", "auto"))
        assert f"is in use by facedeblur train (PID {holder})" in message

        os.kill(launcher.pid, signal.SIGKILL)  # only the launcher
        launcher.wait()
        deadline = time.monotonic() + 120
        while any(running(pid) for pid in workers):
            assert time.monotonic() < deadline, "orphaned workers still running"
            time.sleep(0.1)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    # They stopped as on SIGTERM: a checkpoint of the step they reached, the folder free.
    assert "stopped at step" in log_path.read_text()
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert csv_steps(run / "train.csv") == list(range(1, len(csv_steps(run / "train.csv")) + 1))
    assert step >= 2
    with FolderLock(run, "test"):
        pass


def test_a_launcher_thread_that_ends_does_not_stop_a_worker():
    """The parent-death signal also comes when one thread of a living launcher ends: the
    parent process is the same, so no SIGTERM follows (a killed launcher is tested above)."""
    code = ("import os, signal, sys, time\n"
            "from facedeblur_ext.training.distributed import LAUNCHER_GONE_SIGNAL, "
            "stop_with_launcher\n"
            "signal.signal(signal.SIGTERM, lambda *a: print('SIGTERM', flush=True))\n"
            "assert stop_with_launcher()\n"
            "os.kill(os.getpid(), LAUNCHER_GONE_SIGNAL)\n"
            "time.sleep(0.3)\n"
            "print('alive', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["alive"]


# ----------------------------------------------------------------------------- stop signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_to_the_whole_process_group_saves_and_stops(tmp_path, signum):
    """Ctrl-C in a terminal (SIGINT) and `pkill -f` (SIGTERM) reach the DataLoader workers too:
    they ignore it, and the main process finishes its step, saves and stops (a killed worker
    used to end the run with "DataLoader worker ... is killed" and no final checkpoint)."""
    run = tmp_path / "run"
    argv = train_argv(run, "train.max_steps=100000", "train.checkpoint_every=100000",
                      "train.num_workers=1", "val.at_end=false")
    process = subprocess.Popen([sys.executable, "-m", "facedeblur_ext", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=subprocess_env(), start_new_session=True)
    deadline = time.monotonic() + 240
    while process.poll() is None and logged_steps(run) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-3000:]
    os.killpg(process.pid, signum)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 128 + signum, err[-3000:]
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["step"] >= 2 and f"stopped at step {saved['step']}" in out, out[-2000:]
