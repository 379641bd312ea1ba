"""The device rule where launch/run.sh and launch/quickstart.sh apply it, and torchrun with more ranks
than GPUs. tests/unit/test_device.py checks the rule itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lh_dist.parallel.device import CPU_RANKS

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[2]
SMALL = [*SMALL_RUN, "logging.eval_interval=4", "checkpoint.interval=4"]


def _env(**knobs: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "NPROC_PER_NODE")}
    return env | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | knobs


def test_run_sh_starts_one_rank_per_visible_gpu_by_default():
    gpus = torch.cuda.device_count()
    r = subprocess.run(["bash", "launch/run.sh", "parallel.cp_degree=1"], cwd=REPO, env=_env(DRY_RUN="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"1 node(s) x {gpus or CPU_RANKS} process(es)" in r.stdout
    if not gpus:
        return  # device=cpu below changes nothing on a machine without GPUs
    r = subprocess.run(["bash", "launch/run.sh", "device=cpu"], cwd=REPO, env=_env(DRY_RUN="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"1 node(s) x {CPU_RANKS} process(es)" in r.stdout


def test_quickstart_trains_on_whatever_this_machine_has(tmp_path, stdlib_dataset):
    gpus = torch.cuda.device_count()
    run_dir = tmp_path / "run"
    r = subprocess.run(["bash", "launch/quickstart.sh", *SMALL, "schedule.steps=4"], cwd=REPO,
                       env=_env(DATA=str(stdlib_dataset), RUN_DIR=str(run_dir)),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    if gpus == 0:
        assert "quickstart: 2 CPU ranks" in r.stdout
        assert "world 2 = dp 1 x cp 2" in r.stdout and "device cpu" in r.stdout
    elif gpus == 1:
        assert "quickstart: 1 GPU, so 1 rank on it with parallel.cp_degree=1" in r.stdout
        assert "world 1 = dp 1 x cp 1" in r.stdout and "device cuda:0" in r.stdout
    else:
        assert "world 2 = dp 1 x cp 2" in r.stdout and "device cuda:0" in r.stdout
    assert (run_dir / "checkpoints/step_00000004").is_dir()
    assert f"Done. Run directory: {run_dir}" in r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchrun_with_a_rank_more_than_gpus_stops_every_rank(tmp_path, stdlib_dataset):
    """The GPU twin of test_lh_train_stops_before_any_process_group, with real counts and torchrun."""
    gpus = torch.cuda.device_count()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={gpus + 1}", "-m", "lh_dist.train.cli",
                        "--config", str(REPO / "configs/tiny-cpu.yaml"), "parallel.cp_degree=1",
                        f"data.path={stdlib_dataset}", f"logging.run_dir={tmp_path / 'run'}"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    # torchrun stops the other ranks once one has failed, so not every rank may live to print the line.
    assert f"lh-train: config error: {gpus + 1} ranks on this node but {gpus} visible GPU" in r.stderr, r.stderr
    assert "out of range" not in r.stderr  # the crash this rule replaces
    assert not (tmp_path / "run").exists()
