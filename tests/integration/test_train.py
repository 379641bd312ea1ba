"""End-to-end training runs with real processes: torchrun, gloo, DeepSpeed, streaming shards, TensorBoard."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lh_dist.train.loop import PREEMPTED_EXIT_CODE

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[2]
SMALL = [*SMALL_RUN, "logging.eval_interval=5", "logging.eval_batches=2", "checkpoint.interval=5"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def train_cmd(nproc: int, run_dir: Path, data: Path, *overrides: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return launcher + ["-m", "lh_dist.train.cli", "--config", str(REPO / "configs/tiny-cpu.yaml"),
                       f"data.path={data}", f"logging.run_dir={run_dir}", *SMALL, *overrides]


def run(cmd, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    return result


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


LIGHTHOUSE = ["data.seq_len=1024", "data.micro_batch=1", "schedule.lighthouse_steps=4", "lighthouse.levels=2",
              "lighthouse.pooling=2", "lighthouse.topk=512", "lighthouse.dense_layers=[0]",
              "logging.selection_map_interval=2"]


def test_two_rank_cp_lighthouse_then_dense_resumes_exactly(tmp_path, stdlib_dataset):
    full, split = tmp_path / "full", tmp_path / "split"
    r = run(train_cmd(2, full, stdlib_dataset, "schedule.steps=20", *LIGHTHOUSE))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (full / "config.yaml").is_file()
    assert [p.name for p in sorted((full / "checkpoints").iterdir())] == ["step_00000015", "step_00000020"]
    losses = scalars(full, "train/loss")
    assert sorted(losses) == list(range(1, 21))
    assert sorted(scalars(full, "val/loss")) == [5, 10, 15, 20]
    assert "step 4: attention phase is now dense" in r.stdout
    phase = scalars(full, "lighthouse/active")
    assert [phase[s] for s in range(1, 21)] == [1.0] * 4 + [0.0] * 16
    acc = EventAccumulator(str(full / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = acc.Images("lighthouse/selection_map")
    assert [e.step for e in images] == [2, 4]  # on the scalars' steps (every 2 in the Lighthouse phase)
    assert images[0].width >= 1000 and images[0].height >= 200

    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/loss", "val/loss", "val/loss_stderr", "train/lr", "train/grad_norm", "train/tokens_seen",
                    "train/nonfinite_steps", "perf/tokens_per_s", "perf/tokens_per_s_per_device", "perf/step_time_s",
                    "lighthouse/active", "lighthouse/S", "lighthouse/S_over_N"}  # perf/mfu, memory: GPUs only
    assert scalars(full, "lighthouse/S")[1] == 1024 // 2 + 2 * 512  # N/p^(L-1) + (L-1) p k
    assert scalars(full, "train/tokens_seen")[20] == 20 * 1024  # seq_len x micro_batch 1 x dp 1
    config_text = acc.Tensors("train/config/text_summary")
    assert config_text[0].step == 0 and b"topk: 512" in config_text[0].tensor_proto.string_val[0]
    lines = r.stdout.splitlines()
    first = next(line for line in lines if line.startswith("step      1/20"))
    assert "eta 0:00:00" not in first and "grad " in first and "elapsed " in first and " lighthouse " in first
    assert lines[-1].startswith("lh_dist: run complete at step 20/20 after ")
    assert "(4 Lighthouse, 16 dense)" in lines[-1] and "validation loss" in lines[-1]
    assert lines[-1].endswith(f"Newest checkpoint: {full / 'checkpoints' / 'step_00000020'}.")

    # The same run killed (SIGKILL) once it has written a checkpoint past the switch, then resumed:
    # the resumed run is dense and its losses equal the uninterrupted run's. (The killed run is set
    # to go on for long, so the kill always lands mid-run; constant LR makes its steps identical.)
    proc = subprocess.Popen(train_cmd(2, split, stdlib_dataset, "schedule.steps=1000", *LIGHTHOUSE), cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Watch the file system, not the log: a complete checkpoint is a renamed step_* folder.
    deadline = time.monotonic() + 300
    while not any((split / "checkpoints").glob("step_*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    # Like a crashed node: torchrun and its workers (which run in sessions of their own) all at once.
    for pid in [proc.pid, *_descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    r2 = run(train_cmd(2, split, stdlib_dataset, "schedule.steps=20", *LIGHTHOUSE))
    assert r2.returncode == 0, r2.stdout + r2.stderr
    resumed_at = re.search(r"resumed from \S+ at step (\d+) \(dense phase\)", r2.stdout)
    assert resumed_at, r2.stdout[-3000:]
    start = int(resumed_at.group(1))
    assert start in (5, 10, 15)
    assert "attention phase is now" not in r2.stdout  # resumed mid-phase: no switch to announce
    resumed = scalars(split, "train/loss")
    for step in range(start + 1, 21):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6, abs=1e-6), step


def test_same_losses_for_every_dp_cp_layout_in_both_phases(tmp_path, stdlib_dataset):
    """DP and CP change only the order of floating-point sums, never the math.

    One rank with micro-batch 2 and two DP ranks with micro-batch 1 see the same two samples per
    step; their difference measures the rounding noise of reordering sums. CP=2 and DP=2 x CP=2
    (ZeRO 3) must stay within twice that noise (plus one float32 ulp of the loss).
    """
    common = [*LIGHTHOUSE, "schedule.steps=6", "schedule.lighthouse_steps=3", "logging.eval_interval=100",
              "checkpoint.interval=100", "parallel.zero_stage=1"]
    layouts = {
        "single": (1, ["parallel.cp_degree=1", "data.micro_batch=2"]),
        "dp2": (2, ["parallel.cp_degree=1", "data.micro_batch=1"]),
        "cp2": (2, ["parallel.cp_degree=2", "data.micro_batch=2"]),
        "dp2cp2": (4, ["parallel.cp_degree=2", "data.micro_batch=1", "parallel.zero_stage=3"]),
    }
    curves = {}
    for name, (nproc, extra) in layouts.items():
        r = run(train_cmd(nproc, tmp_path / name, stdlib_dataset, *common, *extra))
        assert r.returncode == 0, name + r.stdout + r.stderr
        curves[name] = torch.tensor([scalars(tmp_path / name, "train/loss")[s] for s in range(1, 7)],
                                    dtype=torch.float64)
    ref = curves["single"]
    noise = (curves["dp2"] - ref).abs().max()
    tol = 2 * noise + torch.finfo(torch.float32).eps * ref.abs().max()
    for name in ("cp2", "dp2cp2"):
        assert (curves[name] - ref).abs().max() <= tol, (name, curves[name] - ref, noise)
    assert ref[-1] < ref[0]  # it trains


def test_sigterm_checkpoints_and_exits_with_documented_code(tmp_path, stdlib_dataset):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lh_dist.train.cli", "--config", str(REPO / "configs/tiny-cpu.yaml"),
           f"data.path={stdlib_dataset}", f"logging.run_dir={run_dir}", "parallel.cp_degree=1", *SMALL,
           "schedule.steps=100000", "checkpoint.interval=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step      3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, "".join(lines) + out
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) >= 3
    summary = out.splitlines()[-1]
    assert summary.startswith(f"lh_dist: run stopped by SIGTERM at step {int(saved[0].name[5:])}/100,000 after ")
    assert summary.endswith(f"Newest checkpoint: {saved[0]}."), summary


def test_config_error_before_any_work(tmp_path):
    r = run([sys.executable, "-m", "lh_dist.train.cli", "--config", str(REPO / "configs/tiny-cpu.yaml"),
             "optim.lr=-1", f"logging.run_dir={tmp_path / 'x'}"], timeout=120)
    assert r.returncode == 2
    assert "optim.lr" in r.stderr and "positive" in r.stderr
    assert not (tmp_path / "x").exists()
