"""launch/run.sh: the dry-run plan, and two "nodes" on localhost joined by a c10d rendezvous."""

import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lh_dist.parallel.distributed import free_port

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[2]
SMALL = [*SMALL_RUN, "logging.eval_interval=5", "logging.eval_batches=2", "checkpoint.interval=5"]


def launch_env(**knobs: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return env | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | knobs


def test_dry_run_prints_the_plan_for_the_whole_world():
    env = launch_env(DRY_RUN="1", NNODES="2", NPROC_PER_NODE="4", RDZV_ENDPOINT="node0:29500",
                     CONFIG="configs/paper-530m-98k.yaml")
    r = subprocess.run(["bash", "launch/run.sh", "parallel.cp_degree=4"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "2 node(s) x 4 process(es) = world size 8" in r.stdout
    assert "node 1: ranks 4..7" in r.stdout
    assert "world size 8 = dp 2 x cp 4" in r.stdout
    assert "CP groups (ranks sharing one sample): [(0, 1, 2, 3), (4, 5, 6, 7)]" in r.stdout
    assert "CP groups stay inside one node" in r.stdout

    # CP groups wider than a node are allowed, with a warning: their ring traffic crosses the network.
    r = subprocess.run(["bash", "launch/run.sh", "parallel.cp_degree=4"], cwd=REPO,
                       env=env | {"NPROC_PER_NODE": "2"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning: CP groups of 4 ranks span nodes" in r.stdout

    # A dry run needs no rendezvous endpoint; a real launch of several nodes does.
    no_endpoint = {k: v for k, v in env.items() if k != "RDZV_ENDPOINT"}
    r = subprocess.run(["bash", "launch/run.sh", "parallel.cp_degree=4"], cwd=REPO, env=no_endpoint,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "set it to host:port of node 0 to launch" in r.stdout
    r = subprocess.run(["bash", "launch/run.sh", "parallel.cp_degree=4"], cwd=REPO,
                       env=no_endpoint | {"DRY_RUN": "0"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "NNODES=2 needs RDZV_ENDPOINT=host:port of node 0" in r.stderr

    # A CP degree that does not divide the world is refused before anything starts.
    r = subprocess.run(["bash", "launch/run.sh", "parallel.cp_degree=4"], cwd=REPO,
                       env=env | {"NPROC_PER_NODE": "3"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "cp_degree=4 must divide the world size 6" in r.stderr


@pytest.mark.parametrize("knobs, message", [
    ({"NPROC_PER_NODE": "abc"}, "run.sh: NPROC_PER_NODE must be a positive integer, got 'abc'"),
    ({"NPROC_PER_NODE": "2x"}, "run.sh: NPROC_PER_NODE must be a positive integer, got '2x'"),
    ({"NNODES": "0"}, "run.sh: NNODES must be a positive integer, got '0'"),
    ({"NNODES": "2", "NODE_RANK": "2"}, "run.sh: NODE_RANK must be in 0..1 (NNODES=2), got '2'"),
])
def test_knobs_that_are_not_counts_are_one_line(knobs, message):
    for dry_run in ("1", "0"):  # refused before any Python starts, dry run or not
        r = subprocess.run(["bash", "launch/run.sh"], cwd=REPO, env=launch_env(DRY_RUN=dry_run, **knobs),
                           capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (2, message + "\n"), r.stdout + r.stderr


def _can_isolate_nodes() -> bool:
    """Each "node" needs its own /dev/shm (streaming keeps per-node state there): a mount namespace."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_isolate_nodes(),
                    reason="needs root and `unshare --mount` to give each localhost node its own /dev/shm")
def test_two_nodes_on_localhost_train_to_completion(tmp_path, stdlib_dataset):
    run_dir, port = tmp_path / "run", free_port()
    overrides = [f"data.path={stdlib_dataset}", f"logging.run_dir={run_dir}", *SMALL, "schedule.steps=8"]
    # Two machines do not share /dev/shm or /tmp: give each node process private ones.
    node = 'mount -t tmpfs tmpfs /dev/shm && exec bash launch/run.sh "$@"'
    procs, logs = [], []
    try:
        for rank in (0, 1):
            tmp = tmp_path / f"node{rank}-tmp"
            tmp.mkdir()
            log = open(tmp_path / f"node{rank}.log", "w+")
            logs.append(log)
            env = launch_env(NNODES="2", NPROC_PER_NODE="1", NODE_RANK=str(rank), TMPDIR=str(tmp),
                             RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="two-nodes",
                             LOG_DIR=str(tmp_path / f"logs{rank}"))
            procs.append(subprocess.Popen(["unshare", "--mount", "--", "sh", "-c", node, "run.sh", *overrides],
                                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:  # a node left waiting on its peer is stopped with its workers
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n".join(outputs)

    text = "".join(outputs)
    assert "world 2 = dp 1 x cp 2" in text  # one CP group spanning both nodes
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step_00000005", "step_00000008"]
    assert len(list((run_dir / "checkpoints/step_00000008").glob("trainer_rank_*.pt"))) == 2
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(losses) == list(range(1, 9))
    assert all(math.isfinite(v) for v in losses.values())
    assert sorted(e.step for e in acc.Scalars("val/loss")) == [5, 8]
    # Per-rank logs from each node's torchrun (--log-dir).
    for rank in (0, 1):
        assert list((tmp_path / f"logs{rank}").rglob("stdout.log")), rank
