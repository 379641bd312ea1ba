"""A new run from another run's weights (`lh-train --init-from`), and the checks that keep a model and
its data together.

The source is a run directory (its newest checkpoint: an imported model's step 0, or any lh_dist run)
or a checkpoint folder. The new run starts at step 0 with those weights, a fresh optimizer and a
fresh data order. Its model must be the source's: every `model.*` field but those a run may choose
(`FREE_MODEL_FIELDS`: RoPE's base and scaling, to extend the context, and the kernel) must match.

A model imported from Hugging Face keeps its tokenizer's identity in `<run_dir>/hf/origin.json`; data
tokenized with another tokenizer is refused (`check_data_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from lh_dist.checkpoint.format import STEP_DIR, flat_config, read_manifest, resolve_checkpoint, setting_changes
from lh_dist.checkpoint.run_dir import INIT_RECORD, RunDirError
from lh_dist.config import ConfigError, TrainConfig
from lh_dist.data.tokenizer import identity_differences, recorded_identity
from lh_dist.hf.mapping import HF_DIR, read_origin

# Model fields a run started from another run's weights may set for itself (prefixes of flat names).
FREE_MODEL_FIELDS = ("model.rope_theta", "model.rope_scaling.", "model.attention_backend", "model.init_std")


@dataclasses.dataclass
class InitSource:
    """The checkpoint a run starts from, and the Hugging Face origin of its run (None if not imported)."""

    arg: str  # as given on the command line
    folder: Path
    origin: dict | None
    # Lines the run prints about its source: newer checkpoints passed over (and why), and the model
    # settings this run takes differently from the source's (`changed_settings`).
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.folder.parent.parent


def _free(field: str) -> bool:
    return any(field == f or (f.endswith(".") and field.startswith(f)) for f in FREE_MODEL_FIELDS)


def open_init_source(arg: str, cfg: TrainConfig) -> InitSource:
    """The checkpoint `arg` names; ConfigError (one line) if there is none or its model differs from
    `cfg.model` in a field that must match."""
    skipped: list[str] = []
    try:
        folder = resolve_checkpoint(arg, skipped)
        there = flat_config({"model": read_manifest(folder)["config"]["model"]})
        origin = read_origin(folder.parent.parent)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--init-from {arg}: {e}") from None
    here = flat_config({"model": cfg.to_dict()["model"]})
    differ = [f"{k} is {there.get(k)!r} there, {here.get(k)!r} here" for k in [*here, *(set(there) - set(here))]
              if not _free(k) and there.get(k) != here.get(k)]
    if differ:
        raise ConfigError(f"--init-from {arg}: {'; '.join(differ)} (a run started from weights keeps their "
                          f"model; it may change only {', '.join(f.rstrip('.') for f in FREE_MODEL_FIELDS)})")
    changed = changed_settings(there, here)
    return InitSource(arg, folder, origin, skipped + ([changed] if changed else []))


def changed_settings(there: dict, here: dict) -> str | None:
    """One line naming each free model field (flat names) whose value in this run (`here`) differs from
    the source's (`there`), "source -> this run"; None if none does. model.init_std is left out: the
    weights replace the initialization."""
    notes = setting_changes(there, here, [k for k in sorted({*here, *there}) if _free(k) and k != "model.init_std"])
    return f"model settings differ from the source's (source -> this run): {', '.join(notes)}" if notes else None


def check_data_tokenizer(cfg: TrainConfig, info: dict, origin: dict | None, run_dir: Path,
                         label: str | None = None) -> None:
    """ConfigError if the data (its lh_data.json `info`; `label` names it, default "data.path: <path>") was
    tokenized with another tokenizer than the model's (`origin`, the origin.json of `run_dir`): the
    tokenizer.json's hash and the vocabulary size must match; data written before lh-data recorded the
    hash is compared by vocabulary size. Which token separates documents is the data's choice (lh-data
    --eod-token: continued pre-training often takes the pre-training separator rather than a chat
    model's eos), so it is not compared."""
    if origin is None:
        return
    differ = identity_differences(recorded_identity(info), origin["tokenizer"])
    if differ:
        raise ConfigError(f"{label or f'data.path: {cfg.data.path}'} was tokenized with another tokenizer than the "
                          f"model's ({', '.join(differ)}; the model's is in {run_dir / HF_DIR}): tokenize it with "
                          f"lh-data --tokenizer {run_dir / HF_DIR}")


def record_init(source: InitSource, run_dir: Path) -> None:
    """Write run_dir/INIT_RECORD: the checkpoint the run's weights start from (for lh-export's card)."""
    step = int(STEP_DIR.match(source.folder.name).group(1))
    record = {"checkpoint": str(source.folder.resolve()), "step": step}
    try:
        (run_dir / INIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise RunDirError(f"cannot write {run_dir / INIT_RECORD}: {e}") from None


def copy_origin(source: InitSource, run_dir: Path) -> bool:
    """Give `run_dir` the source's hf/ folder (replacing one there), so that its checkpoints export as the
    imported architecture with its tokenizer; False if the source has none. RunDirError if it cannot."""
    src, dst = source.run_dir / HF_DIR, run_dir / HF_DIR
    if not src.is_dir() or src.resolve() == dst.resolve():
        return False
    try:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    except OSError as e:
        raise RunDirError(f"cannot copy {src} into run dir {run_dir}: {e}") from None
    return True
