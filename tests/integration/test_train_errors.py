"""Every user error of lh-train ends in one line on stderr and exit status 2, and leaves nothing behind
that blocks a rerun. Real single-rank `lh-train` processes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL_RUN
from test_train import REPO, _env

RUN = [*SMALL_RUN, "parallel.cp_degree=1", "logging.eval_interval=100", "checkpoint.interval=2", "schedule.steps=6"]


def lh_train_cmd(run_dir: Path, data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lh_dist.train.cli", "--config", str(REPO / "configs/tiny-cpu.yaml"),
            f"data.path={data}", f"logging.run_dir={run_dir}", *RUN, *args]


def error_line(cmd: list[str]) -> str:
    """The one line a failing lh-train prints (it must exit with 2, without a traceback)."""
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_bad_data_is_named_in_one_line(tmp_path, stdlib_dataset):
    run_dir = tmp_path / "run"
    line = error_line(lh_train_cmd(run_dir, stdlib_dataset, "data.seq_len=8388608"))
    assert line.startswith(f"lh-train: config error: data.path: split 'train' of {stdlib_dataset} holds "), line
    assert line.endswith("0 samples of data.seq_len + 1 = 8,388,609; the run needs 2 (1 batch(es) x micro_batch 2 "
                         "x dp 1)"), line
    assert not run_dir.exists()  # nothing was written, not even the run dir

    broken = tmp_path / "broken"
    shutil.copytree(stdlib_dataset, broken)
    shard = sorted((broken / "train").glob("shard.*.mds"))[0]
    intact = shard.read_bytes()
    changed = bytearray(intact)
    changed[-5] ^= 0xFF
    shard.write_bytes(bytes(changed))  # same size: found when the shard is first read, during training
    line = error_line(lh_train_cmd(run_dir, broken))
    assert line.startswith(f"lh-train: data error: corrupt shard file {shard}: its sha1 is "), line
    assert not (run_dir / "train.lock").exists()

    shard.write_bytes(intact[:-100])
    assert error_line(lh_train_cmd(run_dir, broken)).startswith(
        f"lh-train: config error: data.path: corrupt shard file {shard}: {len(intact) - 100} bytes, index.json says "
        f"{len(intact)}")


def test_an_attention_kernel_that_cannot_run_here_is_named_before_anything_is_written(tmp_path, stdlib_dataset):
    run_dir = tmp_path / "run"
    line = error_line(lh_train_cmd(run_dir, stdlib_dataset, "model.attention_backend=cudnn", "device=cpu"))
    assert line == ("lh-train: config error: model.attention_backend: attention backend 'cudnn' is unavailable: "
                    "cudnn needs CUDA tensors, got device cpu"), line
    assert not run_dir.exists()


def test_a_second_training_on_a_run_dir_is_refused(tmp_path, stdlib_dataset):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lh_dist.checkpoint.run_dir import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
                               str(run_dir)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        line = error_line(lh_train_cmd(run_dir, stdlib_dataset))
        assert line.startswith(f"lh-train: error: run dir {run_dir} is in use by another training (pid "
                               f"{holder.pid} on "), line
        assert sorted(p.name for p in run_dir.iterdir()) == ["train.lock"]  # the holder's, untouched
    finally:
        holder.kill()
        holder.wait()


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--mount", "--", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs root and unshare to mount a small or read-only file system")
def test_read_only_run_dir_and_full_disk(tmp_path, stdlib_dataset):
    def in_mount_namespace(setup: str, cmd: list[str]) -> subprocess.CompletedProcess:
        # The mounts vanish with the namespace: list the run dir from inside it.
        script = f"{setup} && {subprocess.list2cmdline(cmd)}; rc=$?; ls -A {tmp_path}/disk/run/checkpoints 2>/dev/null; exit $rc"
        return subprocess.run(["unshare", "--mount", "--", "sh", "-c", script], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=300)

    disk = tmp_path / "disk"
    disk.mkdir()
    r = in_mount_namespace(f"mount --bind {disk} {disk} && mount -o remount,bind,ro {disk}",
                           lh_train_cmd(disk / "run", stdlib_dataset))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"lh-train: config error: logging.run_dir {disk / 'run'} is on a read-only file system ({disk})"

    # 2.5 MB: room for the first checkpoint (1.3 MB) but not for a second one beside it.
    r = in_mount_namespace(f"mount -t tmpfs -o size=2500k tmpfs {disk}", lh_train_cmd(disk / "run", stdlib_dataset))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"lh-train: error: not enough free space for checkpoint step_00000004 in {disk / 'run/checkpoints'}: it "
        f"needs about "), r.stderr
    assert r.stdout.split()[-1:] == ["step_00000002"], r.stdout  # the last checkpoint intact, no partial save
