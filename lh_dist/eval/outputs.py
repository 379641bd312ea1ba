"""Where `lh-eval` writes, and how: file names from what was evaluated, rounded JSON, an index.

Layout under the output root (default <run_dir>/eval):

    step_00000060/loss-dense.json               + .png, one pair per distinct evaluation
    step_00000060/passkey-256_512_1024.json     + .png
    step_00000060/retrieval-4096_8192.json      + .png
    index.json                                  every output under the root, newest last

A name holds everything that changes the numbers, leaving out what is at its default, so
repeating an evaluation replaces its own files and nothing else; config overrides, --data,
--tokenizer and --filler, which are too long for a name, add a short hash of themselves (the
JSON and the index hold them in full).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import math
import os
from pathlib import Path

# Defaults of the options that a name leaves out when they are at them (lh_dist.eval.cli uses these).
DEFAULT_DEPTHS = [0, 15, 30, 50, 70, 85, 100]
DEFAULT_LOSS = {"batches": 8, "micro_batch": 1, "buckets": 8, "spacing": "linear"}
DEFAULT_RETRIEVAL = {"docs": 16, "depth_bins": 5}
SIGNIFICANT_DIGITS = 6


def _settings_hash(settings: dict) -> str:
    """'-cfg' + 8 hex digits naming the given settings, or '' when there are none."""
    settings = {k: v for k, v in settings.items() if v}
    if not settings:
        return ""
    return "-cfg" + hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def passkey_name(lengths: list[int], depths: list[float], seed: int, overrides: list[str] = (),
                 tokenizer: str | None = None) -> str:
    """e.g. passkey-256_512_1024, passkey-256-depths0_50-seed3."""
    name = "passkey-" + "_".join(str(n) for n in lengths)
    if list(depths) != DEFAULT_DEPTHS:
        name += "-depths" + "_".join(f"{d:g}" for d in depths)
    if seed:
        name += f"-seed{seed}"
    return name + _settings_hash({"overrides": list(overrides), "tokenizer": tokenizer})


def loss_name(phase: str, seq_len: int | None, buckets: int, spacing: str, batches: int, micro_batch: int,
              overrides: list[str] = (), data: str | None = None) -> str:
    """e.g. loss-dense, loss-lighthouse-seq4096-log16-batches32x2. seq_len None: the training length."""
    name = f"loss-{phase}"
    if seq_len:
        name += f"-seq{seq_len}"
    if (buckets, spacing) != (DEFAULT_LOSS["buckets"], DEFAULT_LOSS["spacing"]):
        name += f"-{spacing}{buckets}"
    if (batches, micro_batch) != (DEFAULT_LOSS["batches"], DEFAULT_LOSS["micro_batch"]):
        name += f"-batches{batches}x{micro_batch}"
    return name + _settings_hash({"overrides": list(overrides), "data": data})


def retrieval_name(lengths: list[int], docs: int, depth_bins: int, overrides: list[str] = (),
                   data: str | None = None, filler: str | None = None) -> str:
    """e.g. retrieval-4096_8192, retrieval-8192-docs64-bins10. data None: the config's data.path;
    filler None: the one the dataset records."""
    name = "retrieval-" + "_".join(str(n) for n in lengths)
    if docs != DEFAULT_RETRIEVAL["docs"]:
        name += f"-docs{docs}"
    if depth_bins != DEFAULT_RETRIEVAL["depth_bins"]:
        name += f"-bins{depth_bins}"
    return name + _settings_hash({"overrides": list(overrides), "data": data, "filler": filler})


def rounded(value, digits: int = SIGNIFICANT_DIGITS):
    """`value` with every float rounded to `digits` significant digits (NaN and inf become None)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write_json(path: Path, result: dict) -> None:
    """Write `result` (floats `rounded`) to `path` atomically: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rounded(result), indent=1) + "\n")
    os.replace(tmp, path)


def update_index(root: Path, json_path: Path, entry: dict) -> Path:
    """Add or replace the entry of `json_path` in <root>/index.json; safe against concurrent writers."""
    index = root / "index.json"
    with open(root / ".index.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        outputs = json.loads(index.read_text())["outputs"] if index.is_file() else []
        name = str(json_path.relative_to(root))
        outputs = [e for e in outputs if e["json"] != name]
        outputs.append({"json": name, "png": str(json_path.with_suffix(".png").relative_to(root)),
                        "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds")} | entry)
        write_json(index, {"outputs": outputs})
    return index
