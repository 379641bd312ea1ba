"""Checkpoints that a crash cannot corrupt, and what a run may resume from.

Layout: <run_dir>/checkpoints/step_00000100/ holds DeepSpeed's files, one
`trainer_rank_XXXXX.pt` per rank (step, phase, data position, RNG) and
`manifest.json`. A save is collective:

1. rank 0 checks the free space against the checkpoint's expected size;
2. every rank writes its files into `.partial-step_N` and fsyncs them;
3. after a barrier, the ranks exchange the names of the files each sees (a rank
   always sees its own) and checksum them between them;
4. rank 0 writes `manifest.json` last (files with sizes and CRC32s, step, phase,
   config, world layout, data position) and fsyncs it and the folder;
5. rank 0 renames the folder to `step_N`, setting an existing `step_N` aside first
   and removing it after, and fsyncs `checkpoints/`;
6. rank 0 removes later checkpoints (a rewind abandoned them; the manifest of
   step_N names them, so a crash here cannot resurrect them) and all but the newest
   `checkpoint.keep` at or before N, each renamed aside before it is deleted.

A folder is a checkpoint only if its manifest is valid and every file it lists
exists with the recorded size (and, before loading, checksum). When a run starts,
rank 0 finishes what a crash interrupted: a `.partial-step_N` with a valid manifest
becomes `step_N`, and the leftovers of steps 5 and 6 are removed.

Test hook: LH_DIST_TEST_KILL=<point>:<step>[:<rank>] makes that rank (default 0)
SIGKILL itself during the save of that step, at `write` (its DeepSpeed files
written, its trainer state not yet), `manifest` (after the barrier, before the
manifest), `rename` (an existing step_N set aside, the new one not yet in place) or
`rotate` (the first old checkpoint renamed aside, not yet deleted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lh_dist.config import ConfigError, ModelConfig, TrainConfig, load_config, save_config
from lh_dist.train.run_dir import RUN_OUTPUTS, RunDirError, RunLock, archive_previous_run

STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PARTIAL, REPLACED, DELETING = ".partial-", ".replaced-", ".deleting-"
# First checkpoint of a run, before any was measured: fp32 weights and AdamW's two moments
# take 12 bytes per parameter (bf16 runs add a 2-byte copy); the rest is headroom.
BYTES_PER_PARAM = 16
KILL_ENV = "LH_DIST_TEST_KILL"
KILL_POINTS = ("write", "manifest", "rename", "rotate")

# Settings a resumed run must share with its checkpoint: they fix the weights' shapes and what
# they compute, the data order that the saved position refers to, and Lighthouse's selection.
# Everything else (optimizer, schedule, logging, checkpointing, CP degree) may change; the
# changes are logged.
FIXED_FIELDS = tuple(f"model.{f.name}" for f in dataclasses.fields(ModelConfig)
                     if f.name not in ("attention_backend", "init_std")) + (
    "data.seq_len", "seed", "lighthouse.levels", "lighthouse.pooling", "lighthouse.topk",
    "lighthouse.dense_layers", "lighthouse.scorer", "parallel.zero_stage")


class InvalidCheckpoint(Exception):
    """A folder that is not a complete checkpoint; the message says why."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- files and manifests -----------------------------------------------------------------------

def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def data_location(path: str) -> str:
    """A dataset's identity for resume checks: the URL, or the resolved local path."""
    return path if "://" in path else os.path.realpath(path)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint(config: dict) -> str:
    """Hash of the settings that must not change across a resume."""
    flat = _flat(config)
    return hashlib.sha256(json.dumps([flat.get(k) for k in FIXED_FIELDS]).encode()).hexdigest()[:16]


def read_manifest(folder: Path, deep: bool = False) -> dict:
    """The manifest of a complete checkpoint; InvalidCheckpoint says what is wrong otherwise.

    deep also compares every file's CRC32 (reads the whole checkpoint)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise InvalidCheckpoint(f"it has no {MANIFEST} (an interrupted save)")
    try:
        manifest = json.loads(path.read_text())
        files, step = manifest["files"], manifest["step"]
        manifest["id"], manifest["config"]  # what resume, rotation and export read
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidCheckpoint(f"its {MANIFEST} is unreadable ({e})") from None
    match = STEP_DIR.match(folder.name.removeprefix(PARTIAL))
    if match and int(match.group(1)) != step:
        raise InvalidCheckpoint(f"its {MANIFEST} is for step {step}")
    for name, meta in files.items():
        file = folder / name
        if not file.is_file():
            raise InvalidCheckpoint(f"{name} is missing")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise InvalidCheckpoint(f"{name} has {size} bytes, the manifest says {meta['bytes']}")
        if deep and file_crc32(file) != meta["crc32"]:
            raise InvalidCheckpoint(f"{name} is corrupt (its CRC32 differs from the manifest)")
    return manifest


@dataclasses.dataclass
class Found:
    """A checkpoint folder of a run dir as rank 0 sees it."""

    step: int
    path: Path
    manifest: dict | None
    problem: str | None = None  # why it is not a checkpoint


def survey(root: Path) -> list[Found]:
    """Every step of `root` (a checkpoints/ folder), newest first; checks sizes, not checksums.

    Where step_N is not valid, a `.partial-step_N` with a valid manifest (its save was
    complete, only the rename was missed) stands for step N."""
    if not root.is_dir():
        return []
    found: dict[int, Found] = {}
    for prefix in ("", PARTIAL):
        for path in sorted(root.glob(f"{prefix}step_*")):
            match = STEP_DIR.match(path.name[len(prefix):])
            if not match or not path.is_dir():
                continue
            step = int(match.group(1))
            if step in found and found[step].problem is None:
                continue
            try:
                found[step] = Found(step, path, read_manifest(path))
            except InvalidCheckpoint as e:
                if not prefix:  # a torn partial is a crash's leftover, not a step
                    found[step] = Found(step, path, None, str(e))
    # A rewind's first checkpoint names the later ones it abandoned (by id, in case a step is redone).
    abandoned = {a["id"]: f for f in found.values() if f.problem is None for a in f.manifest.get("abandons", [])}
    for f in found.values():
        if f.problem is None and f.manifest["id"] in abandoned:
            f.problem = f"a rewind abandoned it ({abandoned[f.manifest['id']].path.name} replaces it)"
    return sorted(found.values(), key=lambda f: f.step, reverse=True)


def newest_valid(root: Path, skipped: list[str] | None = None, partial: bool = True) -> Found | None:
    """The newest checkpoint whose files all match the manifest, checksums included.

    partial=False passes over complete saves that still carry their .partial- name."""
    for f in survey(root):
        if not partial and f.path.name.startswith(PARTIAL):
            continue
        if f.problem is None:
            try:
                read_manifest(f.path, deep=True)
                return f
            except InvalidCheckpoint as e:
                f.problem = str(e)
        if skipped is not None:
            skipped.append(f"skipped checkpoint {f.path.name}: {f.problem}")
    return None


# ---- resume checks ---------------------------------------------------------------------------

def check_resume(manifest: dict, folder: Path, cfg: TrainConfig, world_size: int, dp_degree: int) -> list[str]:
    """ConfigError naming each setting that must not change; returns notes on those that did."""
    old, new = _flat(manifest["config"]), _flat(cfg.to_dict())
    refused = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in FIXED_FIELDS if old.get(k) != new[k]]
    if manifest["data"]["path"] != data_location(cfg.data.path):
        refused.append(f"data.path {manifest['data']['path']!r} -> {data_location(cfg.data.path)!r}")
    if refused:
        raise ConfigError(f"cannot resume from {folder}: {'; '.join(refused)} (these must match the "
                          f"checkpoint; use another logging.run_dir for a new run)")
    was = manifest["world"]
    if cfg.parallel.zero_stage > 0 and was["world_size"] != world_size:
        raise ConfigError(f"cannot resume from {folder} on {world_size} ranks: ZeRO stage {cfg.parallel.zero_stage} "
                          f"partitions the optimizer state over the {was['world_size']} ranks that wrote it "
                          f"(the CP/DP split may change, the world size may not; ZeRO stage 0 runs resume on any)")
    samples, per_batch = manifest["data"]["samples_seen"], cfg.data.micro_batch * dp_degree
    if samples % per_batch:
        raise ConfigError(f"cannot resume from {folder}: it has seen {samples} samples, not a multiple of "
                          f"data.micro_batch x dp = {cfg.data.micro_batch} x {dp_degree}")
    notes = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if k not in FIXED_FIELDS and old.get(k) != new[k]
             and k != "logging.run_dir"]
    if (was["world_size"], was["dp_degree"]) != (world_size, dp_degree):
        notes.append(f"world {was['world_size']} (dp {was['dp_degree']} x cp {was['cp_degree']}) -> {world_size} "
                     f"(dp {dp_degree} x cp {cfg.parallel.cp_degree})")
    return [f"resuming with changed settings: {', '.join(notes)}"] if notes else []


@dataclasses.dataclass
class Plan:
    """What a starting run does with its run dir; rank 0 decides, every rank gets a copy."""

    folder: str | None = None  # checkpoint to load (its final step_N path)
    manifest: dict | None = None
    archive: bool = False  # move the previous run's outputs to archive/ (--overwrite)
    messages: list[str] = dataclasses.field(default_factory=list)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Checkpointer:
    """Saves and loads the checkpoints of one run; `open` and `save` are collective."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int = 1, dp_degree: int = 1):
        self.cfg, self.rank, self.world_size, self.dp_degree = cfg, rank, world_size, dp_degree
        self.run_dir = Path(cfg.logging.run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep = cfg.checkpoint.keep
        self.n_params = 0
        self.last_bytes: int | None = None  # size of the newest checkpoint, for the free-space check
        self.lock: RunLock | None = None
        kill = os.environ.get(KILL_ENV, "").split(":")
        self._kill = (kill[0], int(kill[1]), int(kill[2]) if len(kill) > 2 else 0) if len(kill) > 1 else None

    def _kill_point(self, point: str, step: int) -> None:
        if self._kill == (point, step, self.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def _rank0(self, fn):
        """fn() on rank 0; its result, or its error, on every rank."""
        box = [None]
        if self.rank == 0:
            try:
                box = [("ok", fn())]
            except (ConfigError, RunDirError) as e:
                box = [(type(e).__name__, str(e))]
            except Exception as e:
                box = [("failed", f"{type(e).__name__}: {e}")]
                if dist.is_initialized():
                    dist.broadcast_object_list(box, src=0)
                raise
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "ok":
            return value
        raise {"ConfigError": ConfigError, "RunDirError": RunDirError}.get(kind, RuntimeError)(value)

    def _gather(self, obj):
        if not dist.is_initialized():
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # ---- starting a run ------------------------------------------------------------------

    def open(self, resume: str, overwrite: bool = False, rewind: bool = False) -> Plan:
        """Lock the run dir and decide what to resume; checks everything, writes nothing else."""
        return self._rank0(lambda: self._plan(resume, overwrite, rewind))

    def _plan(self, resume: str, overwrite: bool, rewind: bool) -> Plan:
        self.lock = RunLock(self.run_dir)
        plan = Plan(messages=self.lock.acquire())
        found = survey(self.root)
        foreign = resume not in ("auto", "none") and Path(resume).resolve().parent != self.root.resolve()
        if overwrite and not (resume == "none" or foreign):
            raise RunDirError("--overwrite starts a run afresh: it goes with --resume none or with a checkpoint "
                              "of another run (to go back to an earlier checkpoint of this run, use --rewind)")
        if found and (resume == "none" or foreign) and not overwrite:
            what = "--resume none would start another run" if resume == "none" else f"starting from {resume} would " \
                   f"put another run's checkpoints"
            raise RunDirError(
                f"run dir {self.run_dir} already holds checkpoints ({', '.join(f.path.name for f in found)}): "
                f"{what} over them; continue it with --resume auto, pass --overwrite to archive them first, "
                f"or use another logging.run_dir")
        plan.archive = overwrite and any((self.run_dir / name).exists() for name in RUN_OUTPUTS)
        if resume == "auto":
            chosen = newest_valid(self.root, plan.messages)
        elif resume == "none":
            chosen = None
        else:
            chosen = self._explicit(Path(resume), found, foreign, rewind, plan.messages)
        if chosen is not None:
            plan.folder = str(chosen.path if foreign else self.root / step_name(chosen.step))
            plan.manifest = chosen.manifest
            if chosen.path.name.startswith(PARTIAL):
                plan.messages.append(f"completing the interrupted save of {step_name(chosen.step)}")
            plan.messages += check_resume(chosen.manifest, chosen.path, self.cfg, self.world_size, self.dp_degree)
        return plan

    def _explicit(self, folder: Path, found: list[Found], foreign: bool, rewind: bool, messages: list[str]) -> Found:
        if not folder.is_dir() or not STEP_DIR.match(folder.name):
            raise RunDirError(f"--resume must be 'auto', 'none' or a checkpoint folder step_XXXXXXXX, got {folder}")
        try:
            manifest = read_manifest(folder, deep=True)
        except InvalidCheckpoint as e:
            raise RunDirError(f"--resume {folder} is not a complete checkpoint: {e}") from None
        if foreign:
            messages.append(f"starting from {folder}, a checkpoint of another run")
            return Found(manifest["step"], folder, manifest)
        mine = next(f for f in found if f.path.name == folder.name)
        if mine.problem is not None:
            raise RunDirError(f"--resume {folder} is not usable: {mine.problem}")
        later = [f.path.name for f in reversed(found) if f.step > mine.step and f.problem is None]
        if later and not rewind:
            raise RunDirError(f"--resume {folder} is older than the run's newest checkpoint: resuming from it "
                              f"abandons {', '.join(later)}; pass --rewind to do so (they are removed once the "
                              f"first new checkpoint is complete)")
        if later:
            messages.append(f"rewinding to {folder.name}: {', '.join(later)} will be removed once the first new "
                            f"checkpoint is complete")
        return mine

    def start(self, plan: Plan) -> list[str]:
        """Collective: rank 0 archives or repairs the checkpoints and writes config.yaml; returns messages."""
        def work():
            messages = []
            try:
                if plan.archive:
                    messages.append(f"archived the previous run's outputs in {archive_previous_run(self.run_dir)}")
                else:
                    self._repair()
                if plan.manifest is not None:
                    self.last_bytes = sum(f["bytes"] for f in plan.manifest["files"].values())
                tmp = self.run_dir / ".config.yaml.tmp"
                save_config(self.cfg, tmp)
                os.replace(tmp, self.run_dir / "config.yaml")
            except OSError as e:
                raise RunDirError(f"cannot write to run dir {self.run_dir}: {e}") from None
            return messages
        return self._rank0(work)

    def _repair(self) -> None:
        """Finish what a crash interrupted: rename complete partial saves, remove leftovers."""
        found = survey(self.root)
        for f in found:
            if f.problem is None and f.path.name.startswith(PARTIAL):
                self._commit(f.path, self.root / step_name(f.step), f.step)
            elif f.problem is not None and f.manifest is not None:  # abandoned by a rewind
                self._remove(f.path, f.step)
        for leftover in list(self.root.glob(".*")) if self.root.is_dir() else []:
            if leftover.name.startswith((PARTIAL, REPLACED, DELETING)):
                shutil.rmtree(leftover, ignore_errors=True)

    # ---- saving --------------------------------------------------------------------------

    def expected_bytes(self) -> int:
        return self.last_bytes if self.last_bytes is not None else BYTES_PER_PARAM * self.n_params

    def _check_space(self, step: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        need, free = int(1.1 * self.expected_bytes()), shutil.disk_usage(self.root).free
        if free < need:
            raise RunDirError(f"not enough free space for checkpoint {step_name(step)} in {self.root}: it needs "
                              f"about {_size(need)}, {_size(free)} are free; free some space or move the run "
                              f"dir, then resume from the last checkpoint")

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        """Collective: every rank calls it with its own trainer state."""
        final, partial = self.root / step_name(step), self.root / f"{PARTIAL}{step_name(step)}"
        self._rank0(lambda: self._check_space(step))
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        if dist.is_initialized():
            dist.barrier()
        try:
            engine.save(partial)
            self._kill_point("write", step)
            tmp = partial / f"trainer_rank_{self.rank:05d}.pt.tmp"
            torch.save(dict(trainer_state, rng=rng_state()), tmp)
            os.replace(tmp, partial / f"trainer_rank_{self.rank:05d}.pt")
            # Every file this rank wrote is there now; flushing the others' too costs little.
            for path in partial.iterdir():
                try:
                    fsync_path(path)
                except FileNotFoundError:  # another rank's temporary file, renamed meanwhile
                    pass
        except (OSError, RuntimeError) as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise RunDirError(f"writing checkpoint {final} failed on rank {self.rank} ({e}); its partial "
                              f"files were removed") from None
        # The barrier of the protocol: every rank has written and flushed its files.
        if dist.is_initialized():
            dist.barrier()
        # A rank sees its own files at least, so the union of the listings names them all, even where
        # a shared file system shows a directory's new entries late.
        listing = sorted(p.name for p in partial.iterdir() if p.is_file())
        names = sorted(set().union(*self._gather(listing)))
        mine = {n: {"bytes": (partial / n).stat().st_size, "crc32": file_crc32(partial / n)}
                for n in names[self.rank::self.world_size]}
        files = dict(sorted((k, v) for part in self._gather(mine) for k, v in part.items()))
        if self.rank == 0:
            self._kill_point("manifest", step)
            self._write_manifest(partial, step, trainer_state, files)
            self._commit(partial, final, step)
            self._rotate(step)
            self.last_bytes = sum(f["bytes"] for f in files.values())
        if dist.is_initialized():
            dist.barrier()
        return final

    def _write_manifest(self, partial: Path, step: int, trainer_state: dict, files: dict) -> None:
        config = self.cfg.to_dict()
        later = [f for f in survey(self.root) if f.step > step and f.manifest is not None]
        manifest = {
            "format_version": FORMAT_VERSION, "id": uuid.uuid4().hex, "step": step,
            "phase": trainer_state["phase"], "files": files, "config": config, "fingerprint": fingerprint(config),
            "world": {"world_size": self.world_size, "dp_degree": self.dp_degree,
                      "cp_degree": self.cfg.parallel.cp_degree, "zero_stage": self.cfg.parallel.zero_stage},
            "data": dict(trainer_state["data"], path=data_location(self.cfg.data.path)),
            "abandons": [{"name": f.path.name, "id": f.manifest["id"]} for f in later],
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = partial / f"{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, partial / MANIFEST)
        fsync_path(partial)

    def _commit(self, partial: Path, final: Path, step: int) -> None:
        """Rename a complete save into place; a step saved before is set aside first, removed after."""
        aside = self.root / f"{REPLACED}{final.name}"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        self._kill_point("rename", step)
        os.replace(partial, final)
        fsync_path(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def _remove(self, folder: Path, step: int) -> None:
        aside = self.root / f"{DELETING}{folder.name.removeprefix(PARTIAL)}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(folder, aside)
        self._kill_point("rotate", step)
        shutil.rmtree(aside, ignore_errors=True)

    def _rotate(self, step: int) -> None:
        """Remove later steps (abandoned by a rewind, or torn) and all but `keep` valid ones up to `step`."""
        found = survey(self.root)
        kept = [f for f in found if f.step <= step and f.problem is None]
        for f in [f for f in found if f.step > step] + kept[self.keep:]:
            self._remove(f.path, step)

    # ---- loading -------------------------------------------------------------------------

    def load(self, engine, plan: Plan) -> dict:
        """Restore DeepSpeed state and RNG; returns this rank's trainer state.

        On another world size (ZeRO stage 0 only), every rank takes rank 0's trainer state."""
        folder = Path(plan.folder)
        same_world = plan.manifest["world"]["world_size"] == self.world_size
        path = folder / f"trainer_rank_{self.rank if same_world else 0:05d}.pt"
        engine.load(folder)
        state = torch.load(path, weights_only=False)
        set_rng_state(state.pop("rng"))
        return state

    def latest(self) -> Path | None:
        newest = next((f for f in survey(self.root) if f.problem is None), None)
        return newest.path if newest else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder `step_XXXXXXXX`, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if STEP_DIR.match(path.name) and path.is_dir():
        try:
            read_manifest(path)
        except InvalidCheckpoint as e:
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {e}") from None
        return path
    skipped: list[str] = []
    newest = newest_valid(path / "checkpoints", skipped, partial=False)
    if newest is None:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (step_XXXXXXXX) nor a run directory "
                                f"with a complete checkpoint under checkpoints/{detail}")
    return newest.path


def checkpoint_config(folder: Path, overrides: list[str] = ()) -> TrainConfig:
    """The run's config.yaml (two levels above the checkpoint folder) plus `section.field=value` overrides.

    ValueError if config.yaml disagrees with the checkpoint's manifest on a setting that a resume
    may not change (the config belongs to another run)."""
    path = folder.parent.parent / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder must sit in <run_dir>/checkpoints/")
    manifest = read_manifest(folder)
    old, new = _flat(manifest["config"]), _flat(load_config(path).to_dict())
    wrong = [f"{k}={new[k]!r} (the checkpoint has {old.get(k)!r})" for k in FIXED_FIELDS if old.get(k) != new[k]]
    if wrong:
        raise ValueError(f"{path} does not belong to {folder}: it says {', '.join(wrong)}")
    return load_config(path, list(overrides))
