"""The run directory: whether it can be used, who owns it, and archiving a previous run.

Only one training may use a run directory at a time. Global rank 0 holds
`<run_dir>/train.lock`, created with O_EXCL and holding the owner's host, pid and
SLURM job; a thread touches it every `HEARTBEAT_S` seconds. A lock is stale, and
is taken over, when
- its process is gone (same host: the pid and that process's start time no longer match),
- it belongs to an earlier attempt of the same SLURM job (a requeued job starts after
  the previous attempt has ended, possibly on another node),
- or, for another host, its heartbeat is older than `STALE_AFTER_S`, measured against
  the file system's own clock.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from lh_dist.config import ConfigError

LOCK_NAME = "train.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
# What `--overwrite` moves into archive/<time>/: everything lh-train and lh-eval write.
# A run started with --init-from: the checkpoint its weights came from ({"checkpoint", "step"}).
INIT_RECORD = "init_from.json"
RUN_OUTPUTS = ("checkpoints", "tensorboard", "config.yaml", "eval", INIT_RECORD)


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (locked, full, holds another run, ...)."""


def check_run_dir(run_dir: str | Path) -> None:
    """ConfigError unless `run_dir` is, or can be created as, a writable directory. Writes nothing."""
    path = Path(run_dir)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        what = "itself" if existing == path else f"its parent {existing}"
        raise ConfigError(f"logging.run_dir must be a directory, but {what} is a file: {path}")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise ConfigError(f"logging.run_dir {path} is on a read-only file system ({existing})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"logging.run_dir {path} is not writable: no write permission on {existing}")


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (tells a reused pid apart), if /proc has it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return start is None or _process_start(pid) in (None, start)


def _fs_now(directory: Path) -> float:
    """The current time as the file system stamps it (hosts' clocks may disagree; its own does not)."""
    probe = directory / f".clock-{socket.gethostname()}-{os.getpid()}"
    probe.touch()
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


class RunLock:
    """An exclusive, heartbeated lock on a run directory (held by global rank 0)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.identity = {
            "id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self, holder: dict) -> str:
        """Who holds the lock, for messages: "pid P on HOST[, SLURM job J], since TIME"."""
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"

    def stale_reason(self, holder: dict, age_s: float) -> str | None:
        """Why the lock `holder` wrote is stale, or None while its owner may still run."""
        me = self.identity
        if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] \
                and holder.get("slurm_restart") != me["slurm_restart"]:
            return f"it was taken by attempt {holder.get('slurm_restart')} of this SLURM job"
        if holder.get("host") == me["host"]:
            if holder.get("pid") == me["pid"]:
                return "it was left by this process"
            if not _alive(int(holder.get("pid", -1)), holder.get("start")):
                return f"process {holder.get('pid')} has ended"
            return None
        if age_s > STALE_AFTER_S:
            return f"its heartbeat stopped {age_s:.0f} s ago"
        return None

    def _read(self) -> tuple[dict, float] | None:
        """(holder, heartbeat age in s), or None if there is no lock file."""
        for _ in range(50):
            try:
                text, mtime = self.path.read_text(), self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            try:
                return json.loads(text), _fs_now(self.run_dir) - mtime
            except json.JSONDecodeError:
                time.sleep(0.1)  # its owner is still writing it
        return {"host": "?", "pid": "?"}, 0.0

    def acquire(self) -> list[str]:
        """Take the lock or raise RunDirError naming its holder; returns messages (a stale lock removed)."""
        check_run_dir(self.run_dir)
        messages = []
        self._created_dir = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"logging.run_dir {self.run_dir} cannot be created: {e.strerror}") from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = self._read()
                if found is None:
                    continue
                holder, age = found
                reason = self.stale_reason(holder, age)
                if reason is None:
                    raise RunDirError(
                        f"run dir {self.run_dir} is in use by another training ({self.describe(holder)}; "
                        f"lock {self.path}, heartbeat {max(age, 0):.0f} s ago); wait for it to end or use "
                        f"another logging.run_dir") from None
                self._break(holder)
                messages.append(f"removed the stale lock of {self.describe(holder)}: {reason}")
                continue
            except OSError as e:
                raise ConfigError(f"logging.run_dir {self.run_dir} is not writable: {e.strerror}") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.identity))
                f.flush()
                os.fsync(f.fileno())
            atexit.register(self.release)
            self._thread = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
            self._thread.start()
            return messages
        raise RunDirError(f"could not take the lock {self.path}: other processes keep taking it")

    def _break(self, holder: dict) -> None:
        """Remove a stale lock, unless someone replaced it since we read it (then put that one back)."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.identity['id']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            taken = json.loads(aside.read_text())
        except (OSError, json.JSONDecodeError):
            taken = None
        if taken != holder:
            try:
                os.link(aside, self.path)  # fails if yet another process holds the lock by now
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still ours; remove the run dir too if we created it and it is empty."""
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("id") == self.identity["id"]:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only succeeds when nothing was written
            except OSError:
                pass


def archive_previous_run(run_dir: Path) -> Path | None:
    """Move a previous run's outputs into run_dir/archive/<UTC time>/; returns that folder, if any."""
    found = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target, n = run_dir / "archive" / stamp, 1
    while target.exists():
        target, n = run_dir / "archive" / f"{stamp}.{n}", n + 1
    target.mkdir(parents=True)
    for path in found:
        os.replace(path, target / path.name)
    return target
