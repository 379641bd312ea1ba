"""What a checkpoint is, and reading one: its manifest, its config, its weights.

Layout: <run_dir>/checkpoints/step_00000100/ holds DeepSpeed's files, one
`trainer_rank_XXXXX.pt` per rank (step, phase, data position, RNG) and
`manifest.json` (files with sizes and CRC32s, step, phase, config, world layout,
data position). A folder is a checkpoint only if its manifest is valid, of this
FORMAT_VERSION, and every file it lists exists with the recorded size (and, before
loading, checksum). A save in progress lives in `.partial-step_N` until it is
complete (`lh_dist.checkpoint.checkpointer` writes them).
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from pathlib import Path

import torch

from lh_dist.config import ModelConfig, TrainConfig, config_from_dict, load_config

STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PARTIAL = ".partial-"

class InvalidCheckpoint(Exception):
    """A folder that is not a complete checkpoint; the message says why."""


def step_name(step: int) -> str:
    """The folder name of the checkpoint of optimizer step `step`: step_XXXXXXXX."""
    return f"step_{step:08d}"


def file_crc32(path: Path) -> int:
    """CRC32 of a file's bytes, read in 16 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.field": value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def setting_changes(old: dict, new: dict, keys) -> list[str]:
    """"key old -> new" for each of `keys` whose value differs between two flat configs."""
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# Settings a resumed run must share with its checkpoint: they fix the weights' shapes and what
# they compute, the data order that the saved position refers to, and Lighthouse's selection.
# Everything else (optimizer, schedule, logging, checkpointing, CP degree) may change; the
# changes are logged.
FIXED_FIELDS = tuple(f"model.{k}" for k in flat_config(dataclasses.asdict(ModelConfig()))
                     if k not in ("attention_backend", "init_std")) + (
    "data.seq_len", "seed", "lighthouse.levels", "lighthouse.pooling", "lighthouse.topk",
    "lighthouse.dense_layers", "lighthouse.scorer", "parallel.zero_stage")


def saved_settings(manifest: dict) -> dict:
    """The flat config a checkpoint was saved with, read as this lh_dist reads configs: settings added
    since it was written (e.g. model.qk_norm) take their defaults, which is what the run computed."""
    return flat_config(config_from_dict(manifest["config"]).to_dict())


def read_manifest(folder: Path, deep: bool = False) -> dict:
    """The manifest of a complete checkpoint; InvalidCheckpoint says what is wrong otherwise.

    deep also compares every file's CRC32 (reads the whole checkpoint)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise InvalidCheckpoint(f"it has no {MANIFEST} (an interrupted save)")
    try:
        manifest = json.loads(path.read_text())
        files, step, version = manifest["files"], manifest["step"], manifest["format_version"]
        manifest["id"], manifest["config"]  # what resume, rotation and export read
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidCheckpoint(f"its {MANIFEST} is unreadable ({e})") from None
    if version != FORMAT_VERSION:
        raise InvalidCheckpoint(f"its {MANIFEST} has format_version {version!r}; this lh_dist reads format_version "
                                f"{FORMAT_VERSION} only")
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


def skip_line(found: Found) -> str:
    """What a command prints for a checkpoint it passed over: "skipped checkpoint step_X: why"."""
    return f"skipped checkpoint {found.path.name}: {found.problem}"


def newest_valid(root: Path, skipped: list[Found] | None = None, partial: bool = True) -> Found | None:
    """The newest checkpoint whose files all match the manifest, checksums included; the newer
    ones passed over are appended to `skipped`, each with its problem.

    partial=False passes over complete saves that still carry their .partial- name."""
    for f in survey(root):
        if not partial and f.path.name.startswith(PARTIAL):
            f.problem = "a complete save not yet renamed into place (the next lh-train --resume auto does it)"
        if f.problem is None:
            try:
                read_manifest(f.path, deep=True)
                return f
            except InvalidCheckpoint as e:
                f.problem = str(e)
        if skipped is not None:
            skipped.append(f)
    return None


def resolve_checkpoint(path: str | Path, skipped: list[str] | None = None) -> Path:
    """A complete checkpoint folder `step_XXXXXXXX`, or the newest complete checkpoint of a run directory.

    For a run directory, `skipped` receives one line (`skip_line`) per newer checkpoint passed over."""
    path = Path(path)
    if STEP_DIR.match(path.name) and path.is_dir():
        try:
            read_manifest(path)
        except InvalidCheckpoint as e:
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {e}") from None
        return path
    passed: list[Found] = []
    newest = newest_valid(path / "checkpoints", passed, partial=False)
    if newest is None:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if (path / "config.json").is_file() and not (path / "checkpoints").exists():
            raise FileNotFoundError(f"{path} is a Hugging Face model folder, not a checkpoint: lh-import it into a "
                                    f"run directory first")
        detail = f" ({'; '.join(map(skip_line, passed))})" if passed else ""
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (step_XXXXXXXX) nor a run directory "
                                f"with a complete checkpoint under checkpoints/{detail}")
    if skipped is not None:
        skipped += map(skip_line, passed)
    return newest.path


def checkpoint_config(folder: Path, overrides: list[str] = ()) -> TrainConfig:
    """The run's config.yaml (two levels above the checkpoint folder) plus `section.field=value` overrides.

    ValueError if config.yaml disagrees with the checkpoint's manifest on a setting that a resume
    may not change (the config belongs to another run)."""
    path = folder.parent.parent / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder must sit in <run_dir>/checkpoints/")
    manifest = read_manifest(folder)
    old, new = saved_settings(manifest), flat_config(load_config(path).to_dict())
    wrong = [f"{k}={new[k]!r} (the checkpoint has {old.get(k)!r})" for k in FIXED_FIELDS if old.get(k) != new[k]]
    if wrong:
        raise ValueError(f"{path} does not belong to {folder}: it says {', '.join(wrong)}")
    return load_config(path, list(overrides))


def trainer_state(folder: Path) -> dict:
    """Rank 0's trainer state in a checkpoint folder (step, phase, data position, tokens, last losses;
    checkpoints of older versions lack some of them), or {} if it has none."""
    path = Path(folder) / "trainer_rank_00000.pt"
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else {}


def load_model_state(folder: Path) -> dict:
    """Full fp32 model state dict from a checkpoint folder, whatever the ZeRO stage (no process group needed)."""
    folder = Path(folder)
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    # Memory-mapped: ranks of a node that all load the weights share the page cache, not copies.
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)["module"]
    return {k: v.float() for k, v in state.items()}
