"""The run-dir lock held by another process: refused while it lives, taken over once it has ended.

tests/unit/test_checkpoint.py checks the lock's other rules in the test process.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lh_dist.checkpoint.run_dir import LOCK_NAME, RunDirError, RunLock

REPO = Path(__file__).resolve().parents[2]


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    script = ("import sys, time; from lh_dist.checkpoint.run_dir import RunLock; RunLock(sys.argv[1]).acquire(); "
              "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_lock_refuses_a_second_training_and_takes_over_when_its_holder_is_gone(tmp_path):
    run = tmp_path / "run"
    proc = _hold_lock(run)
    try:
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == proc.pid
        with pytest.raises(RunDirError, match=f"run dir {run} is in use by another training \\(pid {proc.pid} on "
                                              f"{socket.gethostname()}, since "):
            RunLock(run).acquire()
    finally:
        proc.kill()
        proc.wait()
    lock = RunLock(run)
    assert lock.acquire() == [f"removed the stale lock of pid {proc.pid} on {socket.gethostname()}, since "
                              f"{holder['since']}: process {proc.pid} has ended"]
    assert json.loads((run / LOCK_NAME).read_text())["id"] == lock.identity["id"]
    lock.release()
    assert not (run / LOCK_NAME).exists()
