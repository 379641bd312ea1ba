"""slurm/train.sbatch on a real one-node SLURM cluster (munged, slurmctld, slurmd started here).

The cluster runs the actual batch script with a CPU override: the tiny config shrunk further,
two gloo processes on one node.
"""

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lh_dist.parallel.distributed import free_port

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[2]
SMALL = [*SMALL_RUN, "logging.eval_interval=5", "logging.eval_batches=2", "checkpoint.interval=5"]

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("slurmctld") is None or shutil.which("munged") is None,
                       reason="SLURM is not installed (apt-get install slurm-wlm slurmctld slurmd munge slurm-client)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster's daemons run as root"),
]


SLURM_CONF = """\
ClusterName=lhtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        self.env["SLURM_CONF"] = str(root / "slurm.conf")

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True, timeout=60).stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (there is no accounting database, so no sacct)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "--oneliner", job_id)))

    def wait_for(self, job_id: str, done, timeout: float, what: str) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if done(info):
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id}: no {what} in {timeout} s; last {info}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.out")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """munged, slurmctld and slurmd in the foreground with private state; stopped by PID at the end."""
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o700)
    key = root / "munge/munge.key"
    key.write_bytes(os.urandom(1024))  # a key of our own: no /etc/munge setup needed
    key.chmod(0o600)
    (root / "slurm.conf").write_text(SLURM_CONF.format(root=root, ctld_port=free_port(), slurmd_port=free_port()))
    c = Cluster(root)
    daemons = []

    def start(name, *cmd):
        log = open(root / f"{name}.daemon.log", "w")
        daemons.append((name, subprocess.Popen(cmd, env=c.env, stdout=log, stderr=subprocess.STDOUT)))

    try:
        # --force: munged as root, with its socket and files in this private folder.
        start("munged", "munged", "--foreground", "--force", f"--socket={root}/munge/socket",
              f"--key-file={key}", f"--log-file={root}/munge/log", f"--pid-file={root}/munge/pid",
              f"--seed-file={root}/munge/seed")
        deadline = time.time() + 30
        while not (root / "munge/socket").exists():
            assert time.time() < deadline and daemons[0][1].poll() is None, (root / "munged.daemon.log").read_text()
            time.sleep(0.1)
        conf = str(root / "slurm.conf")
        start("slurmctld", "slurmctld", "-D", "-i", "-f", conf)
        # -N: this machine's hostname is not the node name in slurm.conf.
        start("slurmd", "slurmd", "-D", "-N", "localhost", "-f", conf)
        deadline = time.time() + 60
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=c.env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            dead = [n for n, p in daemons if p.poll() is not None]
            assert not dead and time.time() < deadline, \
                f"cluster did not come up (dead: {dead}, sinfo {state!r})\n" + \
                "\n".join((root / f"{n}.daemon.log").read_text() for n, _ in daemons)
            time.sleep(0.5)
        yield c
    finally:
        if len(daemons) == 3 and all(p.poll() is None for _, p in daemons):
            # Jobs a failed test left running end first: their processes belong to slurmstepd, not to us.
            subprocess.run(["scancel", "--user", str(os.getuid())], env=c.env, capture_output=True, timeout=60)
            deadline = time.time() + 60
            while time.time() < deadline and subprocess.run(
                    ["squeue", "-h"], env=c.env, capture_output=True, text=True, timeout=60).stdout.strip():
                time.sleep(1)
        for name, proc in reversed(daemons):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def submit(cluster: Cluster, tmp_path: Path, data: Path, name: str, steps: int) -> str:
    """sbatch the real script, with the CPU override in the knobs it documents."""
    env = cluster.env | {
        "CONFIG": "configs/tiny-cpu.yaml",
        "OVERRIDES": " ".join([f"data.path={data}", *SMALL, f"schedule.steps={steps}"]),
        "NPROC_PER_NODE": "2",
        "RUN_ROOT": str(tmp_path / "runs"),
        "RDZV_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    # The template asks for 2 GPU nodes for a day; this cluster has one CPU node.
    out = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--gpus-per-node=0",
                          "--time=15", f"--output={cluster.root}/%x-%j.out", "slurm/train.sbatch"],
                         cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=60).stdout
    return out.strip().split(";")[0]


def event_files_steps(run_dir: Path, tag: str) -> list[dict[int, float]]:
    """Each TensorBoard event file's {step: value}, oldest file first (one file per attempt)."""
    result = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path))
        acc.Reload()
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{path.name}: a step logged twice: {steps}"
        result.append({e.step: e.value for e in events})
    return result


def test_sbatch_trains_to_completion(cluster, tmp_path, stdlib_dataset):
    job_id = submit(cluster, tmp_path, stdlib_dataset, "lh-ci", steps=6)
    info = cluster.wait_for(job_id, lambda j: j["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"),
                            timeout=240, what="end")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.log_tail()

    run_dir = tmp_path / "runs/lh-ci"  # RUN_ROOT / job name
    log = (cluster.root / f"lh-ci-{job_id}.out").read_text()
    assert "world size 2 = dp 1 x cp 2" in log  # the dry-run plan, printed before training
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step_00000005", "step_00000006"]
    assert (run_dir / "config.yaml").is_file()
    (losses,) = event_files_steps(run_dir, "train/loss")
    assert sorted(losses) == list(range(1, 7)) and all(math.isfinite(v) for v in losses.values())
    # Per-rank logs: one stdout/stderr pair for each of the two local ranks.
    assert len(list((run_dir / "logs/node0").rglob("stdout.log"))) == 2


def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path, stdlib_dataset):
    steps = 40
    job_id = submit(cluster, tmp_path, stdlib_dataset, "lh-preempt", steps=steps)
    run_dir = tmp_path / "runs/lh-preempt"
    first = run_dir / "checkpoints/step_00000005"
    deadline = time.time() + 240
    while not first.is_dir():
        assert time.time() < deadline and cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), \
            cluster.log_tail()
        time.sleep(0.2)

    # What SLURM sends before the time limit (#SBATCH --signal=B:USR1@...): USR1 to the batch shell.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    info = cluster.wait_for(job_id, lambda j: int(j["Restarts"]) >= 1 and j["JobState"] == "PENDING"
                            or j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), timeout=120, what="requeue")
    assert info["Restarts"] == "1" and info["JobState"] == "PENDING", cluster.log_tail()
    # SLURM holds a requeued batch job for about two minutes (Reason=BeginTime); let it start sooner,
    # but not within the second its old credential was revoked: slurmd compares whole-second
    # timestamps and would kill the new start ("Job credential revoked").
    time.sleep(3)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    info = cluster.wait_for(job_id, lambda j: j["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"),
                            timeout=240, what="end")
    log = (cluster.root / f"lh-preempt-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", \
        log + cluster.log_tail()

    # The first attempt checkpointed where it stopped; the second resumed exactly there.
    stopped = re.search(r"stop signal received: checkpointed step (\d+)", log)
    assert stopped, log
    n = int(stopped.group(1))
    assert 5 <= n < steps
    assert f"resumed from {run_dir}/checkpoints/step_{n:08d} at step {n}" in log
    assert re.search(rf"step\s+{steps}/{steps}\s+loss", log)
    assert (run_dir / f"checkpoints/step_{steps:08d}").is_dir()

    # Loss history: the first attempt's file ends at n, the resumed one continues from n + 1 to the end;
    # together every step appears exactly once.
    before, after = event_files_steps(run_dir, "train/loss")
    assert sorted(before) == list(range(1, n + 1))
    assert sorted(after) == list(range(n + 1, steps + 1))
    assert all(math.isfinite(v) for v in [*before.values(), *after.values()])
