"""A CPU training run on a machine without a C/C++ compiler: DeepSpeed must not try to build an op,
and nothing may land in the per-user extension cache that every virtual environment shares."""

import os
import subprocess
import sys

from conftest import SMALL_RUN
from test_train import REPO


def test_two_cpu_ranks_train_without_a_compiler_and_build_nothing(tmp_path, stdlib_dataset):
    home, extensions, empty_bin = tmp_path / "home", tmp_path / "torch_extensions", tmp_path / "bin"
    for folder in (home, extensions, empty_bin):
        folder.mkdir()
    # No compiler anywhere: PATH holds one empty folder (Python is started by its full path), and
    # CC/CXX, which torch's extension builder and distutils prefer to PATH, name nothing.
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "XDG_CACHE_HOME")}
    env |= {"PATH": str(empty_bin), "CC": "/nonexistent/cc", "CXX": "/nonexistent/c++", "HOME": str(home),
            "TORCH_EXTENSIONS_DIR": str(extensions), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lh_dist.train.cli", "--config", str(REPO / "configs/tiny-cpu.yaml"), "device=cpu",
           f"data.path={stdlib_dataset}", f"logging.run_dir={run_dir}", *SMALL_RUN, "schedule.steps=2",
           "logging.eval_interval=100", "checkpoint.interval=100"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run complete at step 2/2" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    assert list(extensions.iterdir()) == []
    assert not (home / ".cache" / "torch_extensions").exists()
