"""Checkpoints that a crash cannot corrupt, and what a run may resume from.

The layout of a checkpoint and how it is read are `lh_dist.checkpoint.format`'s. A save
is collective:

1. rank 0 checks the free space against the checkpoint's expected size (the trainer
   also checks it for its first save when it starts);
2. every rank writes its files into `.partial-step_N` and fsyncs them;
3. after a barrier, the ranks exchange the names of the files each sees (a rank
   always sees its own) and checksum them between them;
4. rank 0 writes `manifest.json` last (files with sizes and CRC32s, step, phase,
   config, world layout, data position) and fsyncs it and the folder;
5. rank 0 renames the folder to `step_N`, setting an existing `step_N` aside first
   and removing it after, and fsyncs `checkpoints/`;
6. rank 0 removes later checkpoints that a rewind abandoned (the manifest of step_N
   names them, so a crash here cannot resurrect them), the damaged ones the run walked
   back past when it started, and all but the newest `checkpoint.keep` valid ones at
   or before N, each renamed aside before it is deleted. Nothing else.

When a run starts, rank 0 finishes what a crash interrupted: a `.partial-step_N` with a valid manifest
becomes `step_N`, and the leftovers of steps 5 and 6 are removed.

tests/integration/test_checkpoint_kills.py kills ranks at each of these points (its faults are
injected from outside, `tests/faults/sitecustomize.py`) and checks that every resume is exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lh_dist.checkpoint.format import (FIXED_FIELDS, FORMAT_VERSION, MANIFEST, PARTIAL, STEP_DIR, Found,
                                       InvalidCheckpoint, file_crc32, flat_config, newest_valid,
                                       read_manifest, saved_settings, setting_changes, skip_line, step_name,
                                       survey)
from lh_dist.checkpoint.run_dir import RUN_OUTPUTS, RunDirError, RunLock, archive_previous_run
from lh_dist.config import ConfigError, TrainConfig, save_config
from lh_dist.data.sources import DataSource, compare_data, configured_sources, data_identity
from lh_dist.parallel.comm import barrier

REPLACED, DELETING = ".replaced-", ".deleting-"
# First checkpoint of a run, before any was measured: fp32 weights and AdamW's two moments
# take 12 bytes per parameter (bf16 runs add a 2-byte copy); the rest is headroom.
BYTES_PER_PARAM = 16


def rng_state() -> dict:
    """The random generators' states of this process: Python, NumPy, torch (and CUDA if present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- resume checks ---------------------------------------------------------------------------

def check_resume_arg(resume: str, overwrite: bool, rewind: bool, run_dir: str | Path) -> bool:
    """ConfigError for a --resume / --overwrite / --rewind combination that cannot work; returns whether
    `resume` is a checkpoint of another run than `run_dir`'s. Reads folder names, no checkpoint."""
    foreign = False
    if resume not in ("auto", "none"):
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"--resume must be 'auto', 'none' or an existing checkpoint folder, got {resume!r}")
        if not STEP_DIR.match(path.name):
            hint = (" (a run directory: resume it with --resume auto and logging.run_dir set to it)"
                    if (path / "checkpoints").is_dir() else
                    " (an incomplete save)" if path.name.startswith(PARTIAL) else "")
            raise ConfigError(f"--resume must be 'auto', 'none' or a checkpoint folder step_XXXXXXXX, got "
                              f"{resume!r}{hint}")
        foreign = path.resolve().parent != (Path(run_dir) / "checkpoints").resolve()
    if rewind and resume in ("auto", "none"):
        raise ConfigError("--rewind goes with --resume <checkpoint folder>")
    if overwrite and not (resume == "none" or foreign):
        raise ConfigError("--overwrite goes with --resume none or another run's checkpoint folder: it starts a run "
                          "afresh (to go back to an earlier checkpoint of this run, use --rewind)")
    return foreign


def check_resume(manifest: dict, folder: Path, cfg: TrainConfig, world_size: int, dp_degree: int,
                 sources: list[DataSource] | None = None, accept_changed_data: bool = False) -> list[str]:
    """ConfigError naming each setting that must not change; returns notes on those that did.

    sources: the run's datasets as read now (`data_sources`); their content is compared with the
    checkpoint's record (a dataset rebuilt in place is refused unless accept_changed_data). None
    compares their locations only."""
    old, new = saved_settings(manifest), flat_config(cfg.to_dict())
    refused = setting_changes(old, new, FIXED_FIELDS)
    data = compare_data(manifest["data"], cfg.data, sources if sources is not None else configured_sources(cfg.data))
    refused += data.moved
    if refused:
        raise ConfigError(f"cannot resume from {folder}: {'; '.join(refused)} (these must match the "
                          f"checkpoint; use another logging.run_dir for a new run)")
    if data.changed and not accept_changed_data:
        raise ConfigError(f"cannot resume from {folder}: {'; '.join(data.changed)} differs from the data it was "
                          f"written with (rebuilt in place?), so its data position would count other documents; "
                          f"resume with the same data, use another logging.run_dir, or pass --accept-changed-data")
    was = manifest["world"]
    if cfg.parallel.zero_stage > 0 and was["world_size"] != world_size:
        raise ConfigError(f"cannot resume from {folder} on {world_size} ranks: ZeRO stage {cfg.parallel.zero_stage} "
                          f"partitions the optimizer state over the {was['world_size']} ranks that wrote it "
                          f"(the CP/DP split may change, the world size may not; ZeRO stage 0 runs resume on any)")
    samples, per_batch = manifest["data"]["samples_seen"], cfg.data.micro_batch * dp_degree
    if samples % per_batch:
        raise ConfigError(f"cannot resume from {folder}: it has seen {samples} samples, not a multiple of "
                          f"data.micro_batch x dp = {cfg.data.micro_batch} x {dp_degree}")
    notes = setting_changes(old, new, [k for k in new if k not in FIXED_FIELDS and k != "logging.run_dir"])
    if (was["world_size"], was["dp_degree"]) != (world_size, dp_degree):
        notes.append(f"world {was['world_size']} (dp {was['dp_degree']} x cp {was['cp_degree']}) -> {world_size} "
                     f"(dp {dp_degree} x cp {cfg.parallel.cp_degree})")
    messages = [f"resuming with changed settings: {', '.join(notes)}"] if notes else []
    if data.changed:
        messages.append(f"--accept-changed-data: {'; '.join(data.changed)} changed; the data order restarts from "
                        f"the recorded sample counter ({samples} samples) over different documents, so this is "
                        f"not an exact resume")
    if data.unrecorded:
        messages.append(f"{folder.name} records no content hash of {', '.join(data.unrecorded)} (written by an "
                        f"older lh_dist): resuming as if the data were unchanged")
    return messages


@dataclasses.dataclass
class Plan:
    """What a starting run does with its run dir; rank 0 decides, every rank gets a copy."""

    folder: str | None = None  # checkpoint to load (its final step_N path)
    manifest: dict | None = None
    archive: bool = False  # move the previous run's outputs to archive/ (--overwrite)
    # Damaged checkpoints later than the one resumed: the run's first new checkpoint supersedes them.
    superseded: list[str] = dataclasses.field(default_factory=list)
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
        # The run's datasets (read by the trainer) and whether a changed one may be resumed over.
        self.data_sources: list[DataSource] | None = None
        self.accept_changed_data = False
        self.superseded: list[str] = []  # Plan.superseded, on rank 0

    def on_rank0(self, fn):
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
        return self.on_rank0(lambda: self._plan(resume, overwrite, rewind))

    def _plan(self, resume: str, overwrite: bool, rewind: bool) -> Plan:
        foreign = check_resume_arg(resume, overwrite, rewind, self.run_dir)
        self.lock = RunLock(self.run_dir)
        plan = Plan(messages=self.lock.acquire())
        found = survey(self.root)
        if found and (resume == "none" or foreign) and not overwrite:
            what = "--resume none would start another run" if resume == "none" else f"starting from {resume} would " \
                   f"put another run's checkpoints"
            raise RunDirError(
                f"run dir {self.run_dir} already holds checkpoints ({', '.join(f.path.name for f in found)}): "
                f"{what} over them; continue it with --resume auto, pass --overwrite to archive them first, "
                f"or use another logging.run_dir")
        plan.archive = overwrite and any((self.run_dir / name).exists() for name in RUN_OUTPUTS)
        if resume == "auto":
            skipped = []
            chosen = newest_valid(self.root, skipped)
            plan.messages += map(skip_line, skipped)
            if chosen is None and skipped:
                # Starting afresh here would mix two runs, and its rotation would delete these folders.
                raise RunDirError(
                    f"run dir {self.run_dir} holds checkpoints but none is usable "
                    f"({'; '.join(f'{f.path.name}: {f.problem}' for f in skipped)}): nothing was changed; restore "
                    f"a checkpoint to resume, or pass --resume none --overwrite to archive them and start afresh")
            plan.superseded = [f.path.name for f in skipped]
        elif resume == "none":
            chosen = None
        else:
            chosen = self._explicit(Path(resume), found, foreign, rewind, plan.messages)
            if not foreign:  # damaged later ones (those a rewind abandons keep their manifest)
                plan.superseded = [f.path.name for f in found if f.step > chosen.step and f.manifest is None]
        if chosen is not None and chosen.manifest.get("weights_only"):
            raise RunDirError(f"{chosen.path} holds imported weights without training state: start a run from "
                              f"them with --init-from {chosen.path.parent.parent} and another logging.run_dir")
        if chosen is not None:
            plan.folder = str(chosen.path if foreign else self.root / step_name(chosen.step))
            plan.manifest = chosen.manifest
            if chosen.path.name.startswith(PARTIAL):
                plan.messages.append(f"completing the interrupted save of {step_name(chosen.step)}")
            plan.messages += check_resume(chosen.manifest, chosen.path, self.cfg, self.world_size, self.dp_degree,
                                          self.data_sources, self.accept_changed_data)
        return plan

    def _explicit(self, folder: Path, found: list[Found], foreign: bool, rewind: bool, messages: list[str]) -> Found:
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
            self.superseded = plan.superseded
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
        return self.on_rank0(work)

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
        """Size of the next checkpoint: the last one's, or an estimate from the parameter count before any."""
        return self.last_bytes if self.last_bytes is not None else BYTES_PER_PARAM * self.n_params

    def check_space(self, step: int) -> None:
        """Collective: RunDirError unless the disk has room for checkpoint `step` (`expected_bytes`)."""
        self.on_rank0(lambda: self._check_space(step))

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
        self.check_space(step)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        if dist.is_initialized():
            barrier()
        try:
            engine.save(partial)
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
            barrier()
        # A rank sees its own files at least, so the union of the listings names them all, even where
        # a shared file system shows a directory's new entries late.
        listing = sorted(p.name for p in partial.iterdir() if p.is_file())
        names = sorted(set().union(*self._gather(listing)))
        mine = {n: {"bytes": (partial / n).stat().st_size, "crc32": file_crc32(partial / n)}
                for n in names[self.rank::self.world_size]}
        files = dict(sorted((k, v) for part in self._gather(mine) for k, v in part.items()))
        if self.rank == 0:
            self._write_manifest(partial, step, trainer_state, files)
            self._commit(partial, final, step)
            self._rotate(step)
            self.last_bytes = sum(f["bytes"] for f in files.values())
        if dist.is_initialized():
            barrier()
        return final

    def _write_manifest(self, partial: Path, step: int, trainer_state: dict, files: dict) -> None:
        config = self.cfg.to_dict()
        later = [f for f in survey(self.root) if f.step > step and f.manifest is not None]
        manifest = {
            "format_version": FORMAT_VERSION, "id": uuid.uuid4().hex, "step": step,
            "phase": trainer_state["phase"], "files": files, "config": config,
            "world": {"world_size": self.world_size, "dp_degree": self.dp_degree,
                      "cp_degree": self.cfg.parallel.cp_degree, "zero_stage": self.cfg.parallel.zero_stage},
            "data": dict(trainer_state["data"], **data_identity(self.cfg.data, self.data_sources)),
            "abandons": [{"name": f.path.name, "id": f.manifest["id"]} for f in later],
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if trainer_state.get("weights_only"):  # lh-import's step 0: weights, no optimizer state
            manifest["weights_only"] = True
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
        os.replace(partial, final)
        fsync_path(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def _remove(self, folder: Path, step: int) -> None:
        aside = self.root / f"{DELETING}{folder.name.removeprefix(PARTIAL)}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)

    def _rotate(self, step: int) -> None:
        """Remove what the checkpoint of `step` supersedes: the later steps that a rewind abandoned, the
        damaged ones this run passed over when it started, and all but `keep` valid ones up to `step`.
        Nothing else: a damaged checkpoint this run did not pass over, or one that appeared since, stays."""
        found = survey(self.root)
        gone = [f for f in found if f.step != step and (
            f.path.name in self.superseded or (f.step > step and f.problem is not None and f.manifest is not None))]
        kept = [f for f in found if f.step <= step and f.problem is None and f not in gone]
        for f in gone + kept[self.keep:]:
            self._remove(f.path, step)
        self.superseded = []  # removed: from now on these names are this run's own checkpoints

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
        """The newest complete checkpoint of the run dir (sizes checked, not checksums), or None."""
        newest = next((f for f in survey(self.root) if f.problem is None), None)
        return newest.path if newest else None
