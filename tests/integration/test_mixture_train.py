"""lh-train on a mixture of datasets under CP=2 (exact resume, each source's validation in TensorBoard),
and a dataset rebuilt in place under a run: refused on resume, or accepted with --accept-changed-data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lh_dist.data.shards import write_dataset
from lh_dist.data.tokenizer import ByteTokenizer

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[2]
RUN = [*SMALL_RUN, "logging.eval_batches=2", "logging.eval_interval=3", "checkpoint.interval=3", "device=cpu"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _train(nproc: int, run_dir: Path, *overrides: str, flags=()) -> subprocess.CompletedProcess:
    """lh-train under torchrun with nproc ranks, or as one plain process (nproc 1)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [
        "-m", "lh_dist.train.cli", *flags, "--config", str(REPO / "configs/tiny-cpu.yaml"),
        f"logging.run_dir={run_dir}", *RUN, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _documents(letter: str, count: int, changed: int | None = None):
    rng = np.random.default_rng(ord(letter))
    for i in range(count):
        words = [f"{letter}{j * (i + 1) % 89}" for j in range(int(rng.integers(20, 400)))]
        if i == changed:
            words.reverse()  # the same tokens in another order: same length and document count
        yield f"{letter}{i:03}", " ".join(words)


def _write(path: Path, letter: str, changed: int | None = None) -> Path:
    write_dataset(_documents(letter, 60, changed), path, ByteTokenizer(), source=f"test {letter}", val_fraction=0.2,
                  log=lambda _: None, overwrite=True)
    return path


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_mixture_under_cp2_resumes_exactly_and_validates_each_source(tmp_path):
    a, b = _write(tmp_path / "code", "c"), _write(tmp_path / "prose", "p")
    mixture = ["data.path=", f"data.sources=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1, name: web}}]",
               "parallel.cp_degree=2", "schedule.decay=constant"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    r = _train(2, full, *mixture, "schedule.steps=6")
    assert r.returncode == 0, r.stdout + r.stderr
    # A second run resumes from the first one's step-3 checkpoint (as if that run had stopped there).
    r2 = _train(2, resumed, *mixture, "schedule.steps=6", flags=["--resume", str(full / "checkpoints/step_00000003")])
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "resumed from" in r2.stdout and " at step 3 " in r2.stdout

    # The resumed steps read the same batches (and so compute the same losses) as the uninterrupted run.
    # Both runs do the same arithmetic on the same ranks, so the losses agree to the last bit; the
    # tolerance only absorbs the float32 -> TensorBoard round trip.
    ours, theirs = _scalars(full), _scalars(resumed)
    for step in (4, 5, 6):
        assert theirs["train/loss"][step] == pytest.approx(ours["train/loss"][step], rel=1e-6), step
    # The data position of both runs' final checkpoints: the global counter and each source's.
    positions = [json.loads((run / "checkpoints/step_00000006/manifest.json").read_text())["data"]
                 for run in (full, resumed)]
    assert positions[0] == positions[1] and positions[0]["samples_seen"] == 6 * 2
    assert sum(s["samples_seen"] for s in positions[0]["sources"].values()) == 12
    assert set(positions[0]["datasets"]) == {"code", "web"}

    # Validation per source and overall, with standard errors, at steps 3 and 6.
    keys = {f"val/{k}" for k in ("loss", "loss_stderr", "code/loss", "code/loss_stderr", "web/loss",
                                 "web/loss_stderr")}
    assert keys <= set(ours)
    for step in (3, 6):
        assert {k for k in keys if step in ours[k]} == keys
        # val/loss is the sources' losses weighted 3 : 1 (TensorBoard stores float32: 1e-6 relative).
        weighted = 0.75 * ours["val/code/loss"][step] + 0.25 * ours["val/web/loss"][step]
        assert ours["val/loss"][step] == pytest.approx(weighted, rel=1e-6)
        assert 0 < ours["val/code/loss_stderr"][step] < ours["val/code/loss"][step]
    line = next(line for line in r.stdout.splitlines() if line.startswith("step 6: val "))
    assert "over 8 samples" in line and "; code " in line and "; web " in line and line.count("±") == 3
    # 2 batches x micro_batch 2 per source; the CP ranks of a sample count it once.
    assert line.endswith("over 4 samples")


def test_dataset_rebuilt_in_place_is_refused_on_resume_unless_accepted(tmp_path):
    data, run_dir = _write(tmp_path / "data", "d"), tmp_path / "run"
    args = [f"data.path={data}", "parallel.cp_degree=1"]
    r = _train(1, run_dir, *args, "schedule.steps=3")
    assert r.returncode == 0, r.stdout + r.stderr

    _write(data, "d", changed=7)  # rebuilt in place: same path and document count, other content
    config = (run_dir / "config.yaml").read_bytes()
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    r = _train(1, run_dir, *args, "schedule.steps=6")
    assert r.returncode == 2
    error = r.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("lh-train: config error: cannot resume from "), r.stderr
    assert f"data.path {data} (content_sha256 " in error[0] and "--accept-changed-data" in error[0]
    assert (run_dir / "config.yaml").read_bytes() == config
    assert sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before

    r = _train(1, run_dir, *args, "schedule.steps=6", flags=["--accept-changed-data"])
    assert r.returncode == 0, r.stdout + r.stderr
    accepted = [line for line in r.stdout.splitlines() if line.startswith("--accept-changed-data: ")]
    assert len(accepted) == 1 and "restarts from the recorded sample counter (6 samples)" in accepted[0]
    assert "not an exact resume" in accepted[0] and " at step 3 " in r.stdout
