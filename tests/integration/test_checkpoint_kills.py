"""Kill a real 2-rank training (torchrun, gloo, DeepSpeed) at every point of a save; `--resume auto` must
reproduce the uninterrupted run. Then resume it on another layout and refuse what must not change.

The kills are injected from outside lh_dist: with tests/faults on PYTHONPATH and
LH_DIST_TEST_KILL=<point>:<step>[:<rank>] set, the chosen rank SIGKILLs itself at that point of that save
(tests/faults/sitecustomize.py), like a crashed node, and torchrun ends the other one.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SMALL_RUN
from test_train import REPO, _env

STEPS = 14
RUN = [*SMALL_RUN, "logging.eval_interval=100", "checkpoint.interval=2", "checkpoint.keep=3", f"schedule.steps={STEPS}"]
PROGRESS = re.compile(r"^step\s+(\d+)/\d+\s+loss (\S+)", re.M)


def train(run_dir: Path, data: Path, *args: str, nproc: int = 2, kill: str | None = None,
          timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + ["-m", "lh_dist.train.cli", "--config", str(REPO / "configs/tiny-cpu.yaml"),
                      f"data.path={data}", f"logging.run_dir={run_dir}", *RUN, *args]
    env = _env()
    if kill:
        faults = str(Path(__file__).resolve().parents[1] / "faults")
        env |= {"LH_DIST_TEST_KILL": kill,
                "PYTHONPATH": os.pathsep.join(filter(None, [faults, env.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def printed_losses(stdout: str) -> dict[int, str]:
    """Rank 0's progress lines: {step: loss as printed, 4 decimals}."""
    return {int(step): loss for step, loss in PROGRESS.findall(stdout)}


def event_losses(run_dir: Path) -> list[dict[int, float]]:
    """train/loss of each TensorBoard event file (one per run), oldest first."""
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    out = []
    for path in files:
        acc = EventAccumulator(str(path))
        acc.Reload()
        out.append({e.step: e.value for e in acc.Scalars("train/loss")} if "train/loss" in acc.Tags()["scalars"]
                   else {})
    return out


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_dataset):
    """The uninterrupted run: (run dir, stdout, {step: loss})."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    r = train(run_dir, stdlib_dataset, "--resume", "none")
    assert r.returncode == 0, r.stdout + r.stderr
    (losses,) = event_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert checkpoints(run_dir) == ["step_00000010", "step_00000012", "step_00000014"]
    return run_dir, r.stdout, losses


def test_kill_at_every_save_point_then_resume_auto_reproduces_the_run(tmp_path, stdlib_dataset, reference):
    _, ref_stdout, ref_losses = reference
    ref_printed = printed_losses(ref_stdout)
    run_dir = tmp_path / "run"

    def resumed(kill: str | None, start: int | None, last: int):
        """One attempt; it resumes at `start` (None: from scratch) and logs every step up to `last`."""
        r = train(run_dir, stdlib_dataset, kill=kill)
        log = r.stdout + r.stderr
        assert (r.returncode != 0) == (kill is not None), log
        if start is None:
            assert "resumed from" not in r.stdout, log
        else:
            assert f"resumed from {run_dir}/checkpoints/step_{start:08d} at step {start} (dense phase)" in r.stdout, log
        printed = printed_losses(r.stdout)
        assert sorted(printed) == list(range((start or 0) + 1, last + 1)), log
        assert all(printed[s] == ref_printed[s] for s in printed), (printed, ref_printed)
        return r.stdout

    # Rank 1 dies while the ranks write step 4: its DeepSpeed file is there, its trainer state is not.
    resumed("write:4:1", None, 4)
    assert checkpoints(run_dir) == [".partial-step_00000004", "step_00000002"]
    assert not (run_dir / "checkpoints/.partial-step_00000004/trainer_rank_00001.pt").exists()

    # Rank 0 dies after the barrier of step 6, before the manifest. The torn step 4 was cleared away.
    resumed("manifest:6", 2, 6)
    assert checkpoints(run_dir) == [".partial-step_00000006", "step_00000002", "step_00000004"]
    assert not (run_dir / "checkpoints/.partial-step_00000006/manifest.json").exists()

    # Rank 0 dies with step 8 complete but not yet renamed; the lock it held is stale now.
    out = resumed("rename:8", 4, 8)
    assert re.search(r"removed the stale lock of pid \d+ on .*: process \d+ has ended", out), out
    assert checkpoints(run_dir) == [".partial-step_00000008", "step_00000002", "step_00000004", "step_00000006"]

    # The next run finishes the rename and resumes at step 8. Rank 0 dies during the rotation after
    # step 10, with the first old checkpoint renamed aside and not yet deleted.
    out = resumed("rotate:10", 8, 10)
    assert "completing the interrupted save of step_00000008" in out
    assert checkpoints(run_dir) == [".deleting-step_00000004", "step_00000002", "step_00000006", "step_00000008",
                                    "step_00000010"]

    resumed(None, 10, STEPS)
    assert checkpoints(run_dir) == ["step_00000010", "step_00000012", "step_00000014"]
    final = event_losses(run_dir)[-1]
    assert sorted(final) == list(range(11, STEPS + 1))
    for step, loss in final.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-6, abs=1e-6), step
    assert not (run_dir / "train.lock").exists()


def test_resume_on_one_rank_and_refusals_that_leave_the_run_untouched(tmp_path, stdlib_dataset, reference):
    ref_dir, _, ref_losses = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    config = (run_dir / "config.yaml").read_text()

    # A changed model shape: one line naming each changed field, old and new value (head_dim follows
    # dim / n_heads); config.yaml unchanged.
    r = train(run_dir, stdlib_dataset, "model.dim=128", "parallel.cp_degree=1", nproc=1)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"lh-train: config error: cannot resume from {run_dir}/checkpoints/step_00000014: model.dim 64 -> 128; "
        f"model.head_dim 16 -> 32 (these must match the checkpoint; use another logging.run_dir for a new run)")
    # A fresh start over the checkpoints.
    r = train(run_dir, stdlib_dataset, "--resume", "none", "parallel.cp_degree=1", nproc=1)
    assert r.returncode == 2 and "lh-train: error: run dir" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert (run_dir / "config.yaml").read_text() == config
    assert checkpoints(run_dir) == ["step_00000010", "step_00000012", "step_00000014"]

    # CP 2 -> 1 (ZeRO stage 0 resumes on any layout): the change is logged and training goes on. CP only
    # reorders floating-point sums (test_train measures that noise at ~1e-6 relative); a wrong weight,
    # optimizer state or data position would move the loss by far more than 1e-4.
    r = train(run_dir, stdlib_dataset, "--resume", str(run_dir / "checkpoints/step_00000012"), "--rewind",
              "parallel.cp_degree=1", nproc=1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("resuming with changed settings: parallel.cp_degree 2 -> 1, world 2 (dp 1 x cp 2) -> 1 "
            "(dp 1 x cp 1)") in r.stdout
    assert "rewinding to step_00000012: step_00000014 will be removed once the first new checkpoint is complete" \
        in r.stdout
    resumed = event_losses(run_dir)[-1]
    assert sorted(resumed) == [13, 14]
    for step, loss in resumed.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-4), step
    assert checkpoints(run_dir) == ["step_00000010", "step_00000012", "step_00000014"]

    # Resuming a finished run (here with fewer steps asked for) trains nothing, says so and how to go on,
    # and writes nothing: config.yaml keeps the run's own schedule, and no event file is added.
    config, events = (run_dir / "config.yaml").read_text(), sorted((run_dir / "tensorboard").iterdir())
    r = train(run_dir, stdlib_dataset, "parallel.cp_degree=1", "schedule.steps=12", nproc=1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == (
        f"lh-train: nothing to train: {run_dir} already holds step 14, and schedule.steps is 12; raise "
        f"schedule.steps to train on, or start a new run elsewhere (logging.run_dir=...) or over it (--resume "
        f"none --overwrite)")
    assert (run_dir / "config.yaml").read_text() == config
    assert sorted((run_dir / "tensorboard").iterdir()) == events
    assert checkpoints(run_dir) == ["step_00000010", "step_00000012", "step_00000014"]
