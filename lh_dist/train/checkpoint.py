"""Checkpoints that a crash cannot corrupt.

Layout: <run_dir>/checkpoints/step_00000100/ holds DeepSpeed's shards plus one
`trainer_rank_XXXXX.pt` per rank (step, phase, data position, RNG). Everything
is written into a hidden `.partial-*` folder first; rank 0 renames it into place
only after every rank has finished, so a folder named `step_*` is always
complete and `--resume auto` never sees a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lh_dist.config import TrainConfig, load_config
from lh_dist.train.engine import load_engine, save_engine

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int, rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.rank = keep, rank

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        """Collective: every rank calls it with its own trainer state."""
        final = self.root / f"step_{step:08d}"
        partial = self.root / f".partial-step_{step:08d}"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        save_engine(engine, partial)
        state = dict(trainer_state, rng=rng_state())
        tmp = partial / f"trainer_rank_{self.rank:05d}.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, partial / f"trainer_rank_{self.rank:05d}.pt")
        _barrier()
        if self.rank == 0:
            if final.exists():  # a step saved twice (e.g. a stop signal at a checkpoint step)
                shutil.rmtree(final)
            os.replace(partial, final)
            for old in self.list()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, engine, folder: Path) -> dict:
        """Restore DeepSpeed state and RNG; returns this rank's trainer state."""
        path = folder / f"trainer_rank_{self.rank:05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {path.name}: was it written by a run with "
                                    f"a different number of ranks?")
        load_engine(engine, folder)
        state = torch.load(path, weights_only=False)
        set_rng_state(state.pop("rng"))
        return state

    def resolve(self, resume: str) -> Path | None:
        """`none` -> None; `auto` -> the latest complete checkpoint or None; else a checkpoint folder."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        folder = Path(resume)
        if not folder.is_dir() or not STEP_DIR.match(folder.name):
            raise ValueError(f"--resume must be 'auto', 'none' or a checkpoint folder step_XXXXXXXX, got {resume!r}")
        return folder


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder `step_XXXXXXXX`, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if STEP_DIR.match(path.name) and path.is_dir():
        return path
    latest = Checkpointer(path, keep=1, rank=0).latest()
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (step_XXXXXXXX) nor a run directory "
                                f"with checkpoints under checkpoints/")
    return latest


def checkpoint_config(folder: Path, overrides: list[str] = ()) -> TrainConfig:
    """The run's config.yaml (two levels above the checkpoint folder) plus `section.field=value` overrides."""
    path = folder.parent.parent / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder must sit in <run_dir>/checkpoints/")
    return load_config(path, list(overrides))
