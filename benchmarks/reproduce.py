"""The end-to-end comparison: Lighthouse-then-dense against dense, same weights budget, same data, over seeds.

One training per invocation, so that each fits a time-limited job; then a report over all runs:

    python benchmarks/reproduce.py data                          # build the code corpus and the retrieval set
    python benchmarks/reproduce.py train dense-s0 --lighthouse-fraction 0   --seed 0
    python benchmarks/reproduce.py train lh60-s0  --lighthouse-fraction 0.6 --seed 0
    python benchmarks/reproduce.py train dense-s1 --lighthouse-fraction 0   --seed 1
    python benchmarks/reproduce.py train lh60-s1  --lighthouse-fraction 0.6 --seed 1
    python benchmarks/reproduce.py report                        # -> benchmarks/results/reproduction_v2.md

`train` builds the data if missing, runs `lh-train` (config: configs/repro-64k-v2.yaml, with `seed`,
schedule.lighthouse_steps from the fraction and the mixture's weights from --retrieval-weight), then
`lh-eval loss` (octave buckets), `lh-eval retrieval` (held-out documents of the retrieval source) and
`lh-eval passkey` on the final checkpoint, and leaves everything a report needs in `<results>/<name>/`
(a few MB, no checkpoints): run.json (seed, arm, commands, commit, hardware, data, wall-clock),
scalars.json (every TensorBoard scalar with its step and wall time), the event files, train.log and
the evals. A run whose folder already holds run.json is complete and is skipped, so a time-limited job can
rerun its list of runs. The arm is the fraction: "dense", or "lh60" for 0.6.

`report` reads every `<results>/*/run.json`, groups the runs by arm and states, over seeds, each
arm's mean and spread and each Lighthouse arm's difference from dense with a 95% t-interval (paired
by seed where both arms have the seed). Results recorded without a seed (the first recipe,
configs/repro-64k.yaml: one seed, one corpus) get that recipe's report, benchmarks/results/reproduction.md.

The code corpus is the Python sources installed beside the interpreter (its site-packages), one
document per directory, documents of at least 64K tokens, 2M validation tokens:
`lh-data tree --include '*.py' --min-doc-tokens 65536 --val-tokens 2000000 <site-packages>`.
The retrieval set is `lh-data retrieval` documents of seq_len tokens whose filler is that corpus
(train documents from its train split, held-out ones from its val split).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import yaml

from lh_dist.checkpoint.format import flat_config
from lh_dist.config import load_config
from lh_dist.data.retrieval import RetrievalSettings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "repro-64k-v2.yaml"
DEFAULT_RESULTS = ROOT / "runs" / "reproduce-v2" / "results"
DEFAULT_WORK = ROOT / "runs" / "reproduce-v2" / "work"
REPORT_V1 = ROOT / "benchmarks" / "results" / "reproduction.md"
REPORT_V2 = ROOT / "benchmarks" / "results" / "reproduction_v2.md"
CLOSE = 0.02  # "back within 0.02 nats of dense"
# The names of a mixture config's two sources.
CODE, RETRIEVAL = "code", "retrieval"
# lh-data retrieval's defaults, which hold for the settings its older datasets do not record.
RETRIEVAL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RetrievalSettings)}


def _log(message: str) -> None:
    print(f"reproduce: {message}", flush=True)


def _run(command: list[str], log_file: Path | None = None) -> float:
    """Run a command the way a user would, echoing its output (and saving it); returns seconds taken."""
    _log("$ " + " ".join(command))
    start = time.time()
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"}) as proc:
        with open(log_file, "w") if log_file else open(os.devnull, "w") as sink:
            for line in proc.stdout:
                sys.stdout.write(line)
                sink.write(line)
    if proc.returncode:
        sys.exit(f"reproduce: command failed with status {proc.returncode}: {' '.join(command)}")
    return time.time() - start


def _config(args) -> dict:
    return yaml.safe_load(Path(args.config).read_text())


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def _mixture(cfg: dict, config: str) -> dict[str, str] | None:
    """A mixture config's {source name: path}; None for a config of one corpus (data.path)."""
    sources = cfg["data"].get("sources")
    if not sources:
        return None
    named = {s.get("name"): s["path"] for s in sources}
    if set(named) != {CODE, RETRIEVAL}:
        sys.exit(f"reproduce: {config}: data.sources must be two sources named {CODE!r} and {RETRIEVAL!r}, "
                 f"got {sorted(map(str, named))}")
    return named


def _data_path(args) -> Path:
    """The code corpus: --data, else the config's data.path or its source named "code"."""
    cfg = _config(args)
    mixture = _mixture(cfg, args.config)
    return _resolve(args.data or (mixture[CODE] if mixture else cfg["data"]["path"]))


def _retrieval_path(args) -> Path | None:
    """The retrieval set: --retrieval-data, else the config's source named "retrieval"; None without a mixture."""
    mixture = _mixture(_config(args), args.config)
    return _resolve(getattr(args, "retrieval_data", None) or mixture[RETRIEVAL]) if mixture else None


# ---- data -----------------------------------------------------------------------------------

def ensure_data(args) -> dict:
    """Build the code corpus unless `lh_data.json` already marks a complete one, and with a mixture config
    the retrieval set likewise; returns the corpus's info."""
    path = _data_path(args)
    info_file = path / "lh_data.json"
    if not info_file.is_file():
        roots = args.data_roots or [sysconfig.get_paths()["purelib"]]
        tokenizer = ["--tokenizer", args.tokenizer] + (["--eod-token", args.eod_token] if args.eod_token else [])
        limit = ["--max-docs", str(args.max_docs)] if args.max_docs else []
        _run([sys.executable, "-m", "lh_dist.data.cli", "tree", "--out", str(path), "--overwrite",
              "--include", "*.py", "--min-doc-tokens", str(args.min_doc_tokens),
              "--val-tokens", str(args.val_tokens), *tokenizer, *limit, *roots])
    else:
        _log(f"data: {path} exists, not rebuilt")
    if _retrieval_path(args):
        ensure_retrieval(args, path)
    return json.loads(info_file.read_text())


def ensure_retrieval(args, filler: Path) -> dict:
    """Build the retrieval set (documents of data.seq_len tokens, `filler` the code corpus) unless it
    exists; returns its info. One built for another length, or with other --retrieval-* document
    settings, is refused."""
    path, seq_len = _retrieval_path(args), int(_config(args)["data"]["seq_len"])
    info_file = path / "lh_data.json"
    wanted = {"keys": args.retrieval_keys, "queries": args.retrieval_queries,
              "query_form": args.retrieval_query_form, "queries_per_key": args.retrieval_queries_per_key}
    if not info_file.is_file():
        _run([sys.executable, "-m", "lh_dist.data.cli", "retrieval", "--out", str(path), "--overwrite",
              "--filler", str(filler), "--doc-tokens", str(seq_len), "--train-docs", str(args.retrieval_train_docs),
              "--val-docs", str(args.retrieval_val_docs), "--keys", str(args.retrieval_keys),
              "--queries", str(args.retrieval_queries), "--query-form", args.retrieval_query_form,
              "--queries-per-key", str(args.retrieval_queries_per_key)])
    else:
        _log(f"data: {path} exists, not rebuilt")
    info = json.loads(info_file.read_text())
    recorded = info["retrieval"]
    if recorded["doc_tokens"] != seq_len:
        sys.exit(f"reproduce: {path} holds documents of {recorded['doc_tokens']} tokens, the config's "
                 f"data.seq_len is {seq_len}: remove it or pass another --retrieval-data")
    # A set written before query_form and queries_per_key were recorded has their defaults.
    built = {name: recorded.get(name, RETRIEVAL_DEFAULTS.get(name)) for name in wanted}
    if built != wanted:
        differ = ", ".join(f"{name} {built[name]} (asked {wanted[name]})" for name in wanted
                           if built[name] != wanted[name])
        sys.exit(f"reproduce: {path} was built with other settings: {differ}; remove it or pass another "
                 "--retrieval-data")
    return info


# ---- one training ---------------------------------------------------------------------------

def _commit() -> str:
    """The commit under test: $LH_DIST_COMMIT when set (a copied tree may carry a stale .git), else git's."""
    if os.environ.get("LH_DIST_COMMIT"):
        return os.environ["LH_DIST_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def read_scalars(event_dir: Path) -> dict[str, list[list[float]]]:
    """Every scalar of a TensorBoard log: tag -> [[step, wall_time, value], ...] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [[e.step, e.wall_time, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def arm_name(fraction: float) -> str:
    """The arm of a Lighthouse fraction: "dense" for 0, "lh60" for 0.6."""
    return "dense" if fraction == 0 else f"lh{round(100 * fraction)}"


def _dataset_record(info: dict) -> dict:
    return {k: info.get(k) for k in ("source", "splits", "content_sha256", "min_doc_tokens", "validation")}


def train(args) -> Path:
    """One training and its evaluations into `<results>/<name>/`; a folder already complete is kept."""
    cfg = _config(args)
    steps = int(args.steps or cfg["schedule"]["steps"])
    if not 0 <= args.lighthouse_fraction < 1:
        sys.exit(f"reproduce: --lighthouse-fraction must be in [0, 1), got {args.lighthouse_fraction}")
    seed = args.seed if getattr(args, "seed", None) is not None else int(cfg.get("seed", 0))
    arm = arm_name(args.lighthouse_fraction)
    out = Path(args.results) / args.name
    if (out / "run.json").is_file():
        done = json.loads((out / "run.json").read_text())
        if (done.get("arm"), done.get("seed")) != (arm, seed):
            sys.exit(f"reproduce: {out} holds a run of arm {done.get('arm')} seed {done.get('seed')}, not arm {arm} "
                     f"seed {seed}: choose another name or remove the folder")
        _log(f"{args.name}: {out} is complete (run.json), skipped")
        return out
    interval = int(cfg["logging"]["log_interval"])
    # The switch falls on a logged step, so each phase's wall-clock is read off the log.
    lighthouse_steps = round(args.lighthouse_fraction * steps / interval) * interval
    data_info = ensure_data(args)
    retrieval_path = _retrieval_path(args)

    run_dir = Path(args.work) / args.name
    for folder in (out, run_dir):
        shutil.rmtree(folder, ignore_errors=True)
    out.mkdir(parents=True)
    if retrieval_path:
        weight = args.retrieval_weight
        if not 0 < weight < 1:
            sys.exit(f"reproduce: --retrieval-weight must be in (0, 1), got {weight}")
        # The code corpus first: lh-eval loss reads the first source.
        sources = [{"path": str(_data_path(args)), "weight": 1 - weight, "name": CODE},
                   {"path": str(retrieval_path), "weight": weight, "name": RETRIEVAL}]
        data_overrides = [f"data.sources={json.dumps(sources)}"]
    else:
        weight, data_overrides = None, [f"data.path={_data_path(args)}"]
    overrides = [f"logging.run_dir={run_dir}", *data_overrides, f"seed={seed}", f"schedule.steps={steps}",
                 f"schedule.lighthouse_steps={lighthouse_steps}", *args.overrides]
    init = ["--init-from", str(args.init_from)] if args.init_from else []
    commands = {"train": [sys.executable, "-m", "lh_dist.train.cli", "--config", str(args.config), *init, *overrides]}
    eval_cli = [sys.executable, "-m", "lh_dist.eval.cli"]
    commands["eval_loss"] = [*eval_cli, "loss", str(run_dir), "--batches", str(args.eval_batches),
                             "--buckets", str(args.loss_buckets), "--spacing", args.loss_spacing,
                             "--out", str(out / "eval_loss")]
    if retrieval_path:
        commands["eval_retrieval"] = [*eval_cli, "retrieval", str(run_dir), "--data", str(retrieval_path),
                                      "--docs", str(args.retrieval_docs), "--out", str(out / "eval_retrieval")]
        if args.retrieval_lengths:
            commands["eval_retrieval"] += ["--lengths", args.retrieval_lengths]
    commands["eval_passkey"] = [*eval_cli, "passkey", str(run_dir), "--out", str(out / "eval_passkey")]
    if args.passkey_lengths:
        commands["eval_passkey"] += ["--lengths", args.passkey_lengths]

    started = time.time()
    wall = {step: _run(command, out / f"{step}.log") for step, command in commands.items()}

    (out / "scalars.json").write_text(json.dumps(read_scalars(run_dir / "tensorboard")))
    shutil.copytree(run_dir / "tensorboard", out / "tensorboard")
    shutil.copy(run_dir / "config.yaml", out / "config.yaml")
    record = {
        "name": args.name, "arm": arm, "seed": seed, "steps": steps, "lighthouse_steps": lighthouse_steps,
        "retrieval_weight": weight,
        "commit": _commit(), "hardware": _hardware(), "config": os.path.relpath(Path(args.config).resolve(), ROOT),
        "data": _dataset_record(data_info),
        # The script the user ran (extend.py runs this function too).
        "invocation": ["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]],
        "commands": commands, "train_started": started, "wall_s": wall | {"total": time.time() - started},
    }
    if retrieval_path:
        info = json.loads((retrieval_path / "lh_data.json").read_text())
        record["retrieval_data"] = _dataset_record(info) | {"settings": info["retrieval"]}
    (out / "run.json").write_text(json.dumps(record, indent=1))  # last: its presence marks the folder complete
    shutil.rmtree(run_dir)  # checkpoints stay out of the results
    _log(f"{args.name}: wrote {out} (train {wall['train']:.0f} s, total {record['wall_s']['total']:.0f} s)")
    return out


# ---- the report -----------------------------------------------------------------------------

def _eval_json(folder: Path) -> dict:
    """The result lh-eval wrote under the output root `folder`: the newest one its index names
    (results recorded before lh-eval kept an index hold their one JSON in `folder` itself)."""
    index = folder / "index.json"
    if index.is_file():
        return json.loads((folder / json.loads(index.read_text())["outputs"][-1]["json"]).read_text())
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no evaluation result in {folder}")
    return json.loads(files[0].read_text())


def load_run(folder: Path) -> dict:
    run = json.loads((folder / "run.json").read_text())
    run["scalars"] = json.loads((folder / "scalars.json").read_text())
    run["loss_eval"] = _eval_json(folder / "eval_loss")
    run["passkey_eval"] = _eval_json(folder / "eval_passkey")
    run["retrieval_eval"] = _eval_json(folder / "eval_retrieval") if (folder / "eval_retrieval").is_dir() else None
    run["folder"] = folder
    return run


def _series(run: dict, tag: str) -> list[list[float]]:
    if tag not in run["scalars"]:
        raise KeyError(f"run {run['name']} has no scalar {tag!r}")
    return run["scalars"][tag]


def summarize(run: dict, baseline: dict | None = None, base: dict | None = None, last: int = 3) -> dict:
    """The numbers the report states for one run; with the baseline run and its own summary `base`,
    also the comparison with it. The final validation loss is the mean of the `last` evaluations."""
    val = _series(run, "val/loss")  # [[step, wall, value]]
    k, t0 = run["lighthouse_steps"], run["train_started"]
    final = sum(v for _, _, v in val[-last:]) / len(val[-last:])
    s = {"name": run["name"], "lighthouse_steps": k, "steps": run["steps"], "final_val": final,
         "train_wall_s": run["wall_s"]["train"], "eval_loss": run["loss_eval"]["loss"],
         "passkey_mean": run["passkey_eval"]["mean"]}
    timeline = {int(step): wall for step, wall, _ in _series(run, "train/loss")}
    rates = [(step, v) for step, _, v in _series(run, "perf/tokens_per_s")]
    dense_rates = sorted(v for step, v in rates if step > k)
    lh_rates = sorted(v for step, v in rates if step <= k and k)
    s["tokens_per_s"] = {"lighthouse": lh_rates[len(lh_rates) // 2] if lh_rates else None,
                         "dense": dense_rates[len(dense_rates) // 2] if dense_rates else None}
    first, last = min(timeline), max(timeline)
    s["phase_wall_s"] = {"startup_and_first_steps": timeline[first] - t0,
                         "lighthouse": timeline[k] - timeline[first] if k else 0.0,
                         "dense": timeline[last] - timeline[k if k else first]}
    if baseline is None:
        return s
    base_val = {int(step): v for step, _, v in _series(baseline, "val/loss")}
    s["final_val_diff"] = final - base["final_val"]
    # Only dense-phase evaluations count: the goal is a dense model of the baseline's quality.
    reached = [(step, wall - t0) for step, wall, v in val if step > k and v <= base["final_val"]]
    s["reached_baseline_final"] = {"step": reached[0][0], "wall_s": reached[0][1]} if reached else None
    if k:
        after = [(int(step), v) for step, _, v in val if step > k]
        s["switch_spike"] = switch_metrics(run, k).get("switch/val jump")
        back = [step for step, v in after if step in base_val and v <= base_val[step] + CLOSE]
        s["steps_to_within_close"] = back[0] - k if back else None
    return s


def _fmt(value, spec: str, none: str = "not reached") -> str:
    return none if value is None else format(value, spec)


def _figure_saver(out: Path, prefix: str, names: list[str]):
    """save(fig, name): writes fig as out/<prefix><name>.png, closes it and appends the file's name to `names`."""
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{name}.png", dpi=110)
        plt.close(fig)
        names.append(f"{prefix}{name}.png")

    return save


def _plots(runs: list[dict], out: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    names = []
    save = _figure_saver(out, prefix, names)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, run in enumerate(runs):
        val = _series(run, "val/loss")
        label = f"{run['name']} (Lighthouse {run['lighthouse_steps']} steps)"
        axes[0].plot([s for s, _, _ in val], [v for _, _, v in val], color=colors[i], label=label)
        axes[1].plot([(w - run["train_started"]) / 60 for _, w, _ in val], [v for _, _, v in val], color=colors[i],
                     label=label)
        for ax in axes:
            if run["lighthouse_steps"]:
                x = run["lighthouse_steps"] if ax is axes[0] else next(
                    (w - run["train_started"]) / 60 for s, w, _ in val if s >= run["lighthouse_steps"])
                ax.axvline(x, color=colors[i], linestyle=":", linewidth=1)
    axes[0].set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation loss by step")
    axes[1].set(xlabel="wall-clock since start (min)", ylabel="validation loss (nats/byte)",
                title="Validation loss by wall-clock")
    low = min(v for r in runs for _, _, v in _series(r, "val/loss"))
    for ax in axes:
        ax.set_ylim(low - 0.05, low + 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "val_loss")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        k = run["lighthouse_steps"]
        if not k:
            continue
        width = max(run["steps"] // 8, 20)
        train = [(s, v) for s, _, v in _series(run, "train/loss") if k - width <= s <= k + width]
        ax.plot([s for s, _ in train], [v for _, v in train], color=colors[i], marker=".", label=run["name"])
        ax.axvline(k, color=colors[i], linestyle=":", linewidth=1)
    for i, run in enumerate(runs):
        if not run["lighthouse_steps"]:
            ks = [r["lighthouse_steps"] for r in runs if r["lighthouse_steps"]]
            lo, hi = min(ks) - max(run["steps"] // 8, 20), max(ks) + max(run["steps"] // 8, 20)
            train = [(s, v) for s, _, v in _series(run, "train/loss") if lo <= s <= hi]
            ax.plot([s for s, _ in train], [v for _, v in train], color=colors[i], label=f"{run['name']} (dense)")
    ax.set(xlabel="step", ylabel="training loss (nats/byte)", title="Training loss around the switch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "train_loss_switch")

    plot_position_loss([(run["name"], run["loss_eval"]) for run in runs], out / f"{prefix}position_loss.png",
                       "nats/byte")
    plot_passkey([(run["name"], run["passkey_eval"]) for run in runs], out / f"{prefix}passkey.png")
    return names + [f"{prefix}position_loss.png", f"{prefix}passkey.png"]


def plot_position_loss(curves: list[tuple[str, dict]], path: Path, unit: str, log_x: bool = False) -> None:
    """One line per model: the loss of each position bucket of an `lh-eval loss` result, with its
    standard error as a band where the result has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, result) in enumerate(curves):
        buckets = result["buckets"]
        x = [(b["start"] + b["end"]) / 2 for b in buckets]
        y = [b["loss"] for b in buckets]
        color = plt.get_cmap("tab10").colors[i]
        ax.plot(x, y, color=color, marker="o", label=name)
        if all(b.get("stderr") is not None for b in buckets):
            err = [b["stderr"] for b in buckets]
            ax.fill_between(x, [a - e for a, e in zip(y, err)], [a + e for a, e in zip(y, err)], color=color, alpha=0.2)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set(xlabel="position in the sequence (tokens)", ylabel=f"validation loss ({unit})",
           title="Loss by position (dense attention)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_passkey(panels: list[tuple[str, dict]], path: Path) -> None:
    """One heatmap per model of an `lh-eval passkey` result: accuracy by needle depth and context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 3.6), squeeze=False,
                             layout="constrained")
    for ax, (name, p) in zip(axes[0], panels):
        image = ax.imshow(p["accuracy"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(p["lengths"])), [f"{n // 1024}K" if n >= 1024 else str(n) for n in p["lengths"]],
                      fontsize=7)
        ax.set_yticks(range(len(p["depths"])), [f"{d}%" for d in p["depths"]], fontsize=7)
        ax.set(xlabel="context length", ylabel="needle depth", title=f"{name}: mean {p['mean']:.2f}")
    fig.colorbar(image, ax=axes[0].tolist(), label="pass-key accuracy (chance 0.1)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args) -> Path:
    """The report over every run in --results: over seeds (report_v2) when the runs record their seed,
    else the first recipe's report of one dense run and Lighthouse runs."""
    folders = sorted(p.parent for p in Path(args.results).glob("*/run.json"))
    if not folders:
        sys.exit(f"reproduce: no runs in {args.results} (run `reproduce.py train` first)")
    runs = [load_run(f) for f in folders]
    with_seed = sum("seed" in r for r in runs)
    if with_seed == len(runs):
        return report_v2(runs, Path(args.out or REPORT_V2), args.notes)
    if with_seed:
        sys.exit(f"reproduce: {args.results} mixes runs with a seed and runs without (the first recipe's)")
    args.out = args.out or REPORT_V1
    baselines = [r for r in runs if r["lighthouse_steps"] == 0]
    if len(baselines) != 1:
        sys.exit(f"reproduce: need exactly one dense run (lighthouse_steps 0) in {args.results}, "
                 f"found {len(baselines)}")
    base = baselines[0]
    runs = [base] + sorted((r for r in runs if r is not base), key=lambda r: -r["lighthouse_steps"])
    hashes = {r["data"]["content_sha256"] for r in runs}
    if len(hashes) != 1:
        sys.exit(f"reproduce: the runs were trained on different data (content hashes {sorted(hashes)})")
    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    prefix = out_md.stem + "_"
    plots = _plots(runs, out_md.parent, prefix)
    base_summary = summarize(base)
    summaries = [base_summary] + [summarize(r, base, base_summary) for r in runs[1:]]
    (out_md.parent / f"{prefix}summary.json").write_text(json.dumps(summaries, indent=1))
    notes = Path(args.notes).read_text().strip() if args.notes else ""
    out_md.write_text(_markdown(runs, summaries, plots, notes))
    _log(f"wrote {out_md} and {len(plots)} plots")
    return out_md


def _commits(runs: list[dict]) -> str:
    """One commit for all runs, or each run's when they were made at different commits."""
    commits = {run["commit"] for run in runs}
    if len(commits) == 1:
        return f"Commit: `{runs[0]['commit']}`"
    return "Commits: " + ", ".join(f"{run['name']} `{run['commit']}`" for run in runs)


def _markdown(runs: list[dict], summaries: list[dict], plots: list[str], notes: str = "") -> str:
    base, sb = runs[0], summaries[0]
    data = base["data"]
    splits = data["splits"]
    lines = [
        "# Lighthouse-then-dense against dense: end-to-end reproduction",
        "",
        f"Hardware: {base['hardware']}. {_commits(runs)}. Config: `{base['config']}` "
        f"({base['steps']} steps of {_seq_tokens(base):,} tokens).",
        f"Data: `{data['source']}`; train {splits['train']['documents']:,} documents / "
        f"{splits['train']['tokens']:,} tokens, validation {splits['val']['documents']:,} documents / "
        f"{splits['val']['tokens']:,} tokens (whole documents not in train); content SHA-256 "
        f"`{data['content_sha256']}`.",
        "",
        *_verdicts(summaries),
        "",
        *([notes, ""] if notes else []),
        "Validation loss is the mean over the last three evaluations (the same held-out batches every time). "
        "Wall-clock is measured from the start of `lh-train` (startup included) on the same machine. "
        f"\"Back within {CLOSE}\" is the first evaluation after the switch whose loss is within {CLOSE} of the "
        "dense run's at the same step. Only evaluations in the dense phase count toward reaching dense quality.",
        "",
        "| run | Lighthouse steps | final val loss | vs dense | train wall-clock | reaches dense's final loss |"
        " spike at switch | steps to within 0.02 | final eval loss (dense attn) | pass-key mean |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        reached = s.get("reached_baseline_final")
        lines.append(
            f"| {s['name']} | {s['lighthouse_steps']} | {s['final_val']:.4f} | "
            f"{_fmt(s.get('final_val_diff'), '+.4f', '—')} | {s['train_wall_s'] / 60:.2f} min | "
            + ("—" if s is sb else (f"step {reached['step']}, {reached['wall_s'] / 60:.2f} min" if reached
                                    else "not reached"))
            + f" | {_fmt(s.get('switch_spike'), '+.3f', '—')} | "
            f"{_fmt(s.get('steps_to_within_close'), 'd', '—' if not s['lighthouse_steps'] else 'not by the end')} | "
            f"{s['eval_loss']:.4f} | {s['passkey_mean']:.3f} |")
    lines += ["", "## Throughput and wall-clock by phase", "",
              "| run | tokens/s Lighthouse | tokens/s dense | startup + first logged steps | Lighthouse phase |"
              " dense phase | train total | evaluation (loss + pass-key) |",
              "|---|---|---|---|---|---|---|---|"]
    for run, s in zip(runs, summaries):
        tps, ph, w = s["tokens_per_s"], s["phase_wall_s"], run["wall_s"]
        lines.append(f"| {s['name']} | {_fmt(tps['lighthouse'], ',.0f', '—')} | {_fmt(tps['dense'], ',.0f', '—')} | "
                     f"{ph['startup_and_first_steps']:.0f} s | {ph['lighthouse']:.0f} s | {ph['dense']:.0f} s | "
                     f"{w['train']:.0f} s | {w['eval_loss'] + w['eval_passkey']:.0f} s |")
    lines += ["", "Tokens/s are medians of the logged steps of each phase (console and `perf/tokens_per_s`).", "",
              "## Loss by position (final models, dense attention)", "",
              "| run | " + " | ".join(f"{b['start']:,}–{b['end']:,}" for b in runs[0]["loss_eval"]["buckets"]) + " |",
              "|---|" + "---|" * len(runs[0]["loss_eval"]["buckets"])]
    for run in runs:
        lines.append(f"| {run['name']} | " + " | ".join(f"{b['loss']:.3f}" for b in run["loss_eval"]["buckets"])
                     + " |")
    return "\n".join(lines + _plots_and_commands(runs, plots))


def _plots_and_commands(runs: list[dict], plots: list[str]) -> list[str]:
    """The report's last sections: its plots, and each run's commands."""
    lines = ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Commands", "", "Each run, and what it ran (`python` is the interpreter that ran the script):",
              "", "```"]
    for run in runs:
        lines += [f"# {run['name']}", " ".join(run["invocation"])]
        lines += ["#   " + " ".join(["python"] + c[1:]) for c in run["commands"].values()]
    return lines + ["python benchmarks/reproduce.py report", "```", ""]


def _verdicts(summaries: list[dict]) -> list[str]:
    """One sentence per Lighthouse run, against the dense baseline (the first summary)."""
    base, lines = summaries[0], []
    for s in summaries[1:]:
        reached = s["reached_baseline_final"]
        when = (f"reaches dense's final loss at step {reached['step']}, after {reached['wall_s'] / 60:.2f} min against "
                f"{base['train_wall_s'] / 60:.2f} min for dense's whole run ({base['train_wall_s'] / reached['wall_s']:.2f}x "
                "sooner)" if reached else "does not reach dense's final loss")
        lines.append(f"- **{s['name']}** (Lighthouse for {s['lighthouse_steps']} of {s['steps']} steps) ends "
                     f"{abs(s['final_val_diff']):.3f} {'below' if s['final_val_diff'] < 0 else 'above'} dense "
                     f"({s['final_val']:.4f} vs {base['final_val']:.4f}) and {when}; its whole training took "
                     f"{s['train_wall_s'] / base['train_wall_s']:.2f} of dense's wall-clock.")
    return lines


def _seq_tokens(run: dict) -> int:
    return int(yaml.safe_load((run["folder"] / "config.yaml").read_text())["data"]["seq_len"])


# ---- the report over seeds ------------------------------------------------------------------

# Metric groups of report_v2, in order: key prefix -> (title, number format).
GROUPS = {
    "val_loss": ("Final validation loss by source (nats/token; mean of the last 3 evaluations; "
                 "\"all sources\" weights them as in training)", ".4f"),
    "position_loss": ("Loss by position, code corpus, dense attention (nats/token; octave buckets of the final "
                      "`lh-eval loss`)", ".4f"),
    "context_gain": ("Gain from far context, code corpus: the loss in the last position bucket minus the loss in "
                     "the first (nats/token; below zero: the far context lowers the loss)", ".4f"),
    "switch": ("The switch to dense: the losses around the step where the Lighthouse runs switch, dense runs "
               "at the same steps (nats/token; validation: all sources)", ".3f"),
    "retrieval": ("Retrieval accuracy, held-out documents of the retrieval set (`lh-eval retrieval`)", ".3f"),
    "passkey": ("Pass-key accuracy (`lh-eval passkey`, chance 0.1)", ".3f"),
    "wall": ("Wall-clock of `lh-train` (minutes, startup included)", ".2f"),
    "stability": ("Largest rise of the validation loss between neighbouring evaluations of one phase (nats)", ".3f"),
}


SWITCH_WINDOW = 5  # logged training losses on each side of the switch


def _largest_rise(val: list[list[float]], lighthouse_steps: int) -> float:
    """The largest increase of the validation loss from one evaluation to the next within one phase
    (the switch's own jump is not a swing of training); 0 when it never rises."""
    rises = [b[2] - a[2] for a, b in zip(val, val[1:]) if (a[0] <= lighthouse_steps) == (b[0] <= lighthouse_steps)]
    return max([0.0, *rises])


def switch_metrics(run: dict, switch_step: int) -> dict[str, float]:
    """The losses around `switch_step` (the last step of the Lighthouse phase): the validation loss at the last
    evaluation up to it and at the first after it, their difference, the last evaluation minus the one before the
    switch, and the mean training loss of the SWITCH_WINDOW logged steps after it minus the SWITCH_WINDOW before.
    Of a dense run, the same numbers at the same steps; empty when no evaluation lies on one side."""
    val = _series(run, "val/loss")  # [[step, wall, value]]
    before = [v for step, _, v in val if step <= switch_step]
    after = [v for step, _, v in val if step > switch_step]
    if not before or not after:
        return {}
    train = _series(run, "train/loss")
    train_before = [v for step, _, v in train if step <= switch_step][-SWITCH_WINDOW:]
    train_after = [v for step, _, v in train if step > switch_step][:SWITCH_WINDOW]
    m = {"switch/val before": before[-1], "switch/val after": after[0], "switch/val jump": after[0] - before[-1],
         "switch/val end minus before": val[-1][2] - before[-1]}
    if train_before and train_after:
        m["switch/train jump"] = statistics.fmean(train_after) - statistics.fmean(train_before)
    return m


def run_metrics(run: dict, switch_step: int | None = None, last: int = 3) -> dict[str, float]:
    """One run's numbers, keyed "<group>/<label>" (GROUPS): final validation loss per source, loss per
    position bucket and the gain from far context, retrieval accuracy overall, by length and by depth,
    pass-key, wall-clock, stability, and the losses around `switch_step` (switch_metrics) when given."""
    scalars = run["scalars"]
    sources = [tag.split("/")[1] for tag in scalars if tag.startswith("val/") and tag.endswith("/loss")
               and tag.count("/") == 2]
    m = {}
    for key, tag in [("val_loss/mixture", "val/loss"), *((f"val_loss/{s}", f"val/{s}/loss") for s in sorted(sources))]:
        m[key] = statistics.fmean(v for _, _, v in _series(run, tag)[-last:])
    buckets = run["loss_eval"]["buckets"]
    for b in buckets:
        m[f"position_loss/{b['start']}-{b['end']}"] = b["loss"]
    m["context_gain/last bucket minus first"] = buckets[-1]["loss"] - buckets[0]["loss"]
    r = run["retrieval_eval"]
    if r:
        m["retrieval/mean"] = r["mean"]
        if "token_accuracy" in r:  # results of lh_dist before value tokens were counted lack it
            m["retrieval/value tokens right"] = r["token_accuracy"]
        for e in r["by_length"]:
            if e["queries"]:
                m[f"retrieval/length {e['length']}"] = e["accuracy"]
        # A depth bin over all lengths: the correct queries of its cells over their queries.
        edges = r["depth_edges"]
        for i, (accuracy, queries) in enumerate(zip(r["accuracy"], r["queries"])):
            if sum(queries):
                m[f"retrieval/depth {edges[i]:.2f}-{edges[i + 1]:.2f}"] = sum(
                    a * q for a, q in zip(accuracy, queries) if q) / sum(queries)
    m["passkey/mean"] = run["passkey_eval"]["mean"]
    m["wall/train"] = run["wall_s"]["train"] / 60
    m["stability/largest rise"] = _largest_rise(_series(run, "val/loss"), run["lighthouse_steps"])
    if switch_step:
        m |= switch_metrics(run, switch_step)
    return m


def _label(key: str) -> str:
    group, label = key.split("/", 1)
    if group == "position_loss":
        start, end = label.split("-")
        return f"{int(start):,}–{int(end):,}"
    if label.startswith("length "):
        return f"length {int(label.split()[1]):,}"
    if label.startswith("depth "):
        lo, hi = label.split()[1].split("-")
        return f"depth {float(lo):.0%}–{float(hi):.0%}"
    return {"mixture": "all sources (weighted)",
            "val before": "validation, last evaluation before the switch",
            "val after": "validation, first evaluation after it",
            "val jump": "validation jump (after minus before)",
            "val end minus before": "validation, last evaluation minus the one before the switch",
            "train jump": f"training, mean of {SWITCH_WINDOW} logged steps after minus {SWITCH_WINDOW} before"
            }.get(label, label)


@functools.lru_cache
def t_quantile(p: float, df: float) -> float:
    """The p-quantile (0.5 < p < 1, at most 12.7 for df >= 1 at p = 0.975) of Student's t with `df`
    degrees of freedom: bisection of its distribution function, integrated by Simpson's rule."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)  # [4001]: 4000 intervals of x / 4000
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        return 0.5 + x / 12000 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 64.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value), min, max and count."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def difference(dense: dict[int, float], lighthouse: dict[int, float]) -> dict:
    """Lighthouse minus dense, from {seed: value} of each arm, with a 95% t-interval: over the per-seed
    differences when two or more seeds are in both arms ("paired"), else Welch's unpaired interval when
    each arm has two or more seeds ("welch"), else none (lo, hi None)."""
    common = sorted(set(dense) & set(lighthouse))
    out = {"diff": None, "lo": None, "hi": None, "kind": None, "seeds": common, "df": None}
    if not dense or not lighthouse:
        return out
    if len(common) >= 2:
        d = [lighthouse[s] - dense[s] for s in common]
        mean, se, df, kind = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)), len(d) - 1, "paired"
    elif len(dense) >= 2 and len(lighthouse) >= 2:
        a, b = list(dense.values()), list(lighthouse.values())
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        mean, se, kind = statistics.fmean(b) - statistics.fmean(a), math.sqrt(va + vb), "welch"
        # Welch-Satterthwaite degrees of freedom (any df gives a zero-width interval when both spreads are 0).
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb else len(a) + len(b) - 2
    else:
        return out | {"diff": statistics.fmean(lighthouse.values()) - statistics.fmean(dense.values())}
    half = t_quantile(0.975, df) * se
    return out | {"diff": mean, "lo": mean - half, "hi": mean + half, "kind": kind, "df": df}


def _interval_kind(d: dict, n_dense: int, n_lh: int) -> str:
    if d["kind"] == "paired":
        seeds = ", ".join(map(str, d["seeds"]))
        return f"95% t-interval over the differences of {len(d['seeds'])} paired seeds ({seeds})"
    if d["kind"] == "welch":
        return f"95% Welch t-interval, unpaired: {n_dense} dense and {n_lh} Lighthouse seeds, too few in common"
    return "no interval: it needs two seeds in each arm"


def _with_interval(d: dict, spec: str) -> str:
    if d["diff"] is None:
        return "—"
    if d["lo"] is None:
        return f"{d['diff']:+{spec}} (no interval)"
    return f"{d['diff']:+{spec}} [{d['lo']:+{spec}}, {d['hi']:+{spec}}]"


# Below this mean accuracy dense has not learned retrieval, and the comparison cannot say whether it survives.
DENSE_RETRIEVES = 0.05


def retrieval_verdict(arm: str, d: dict | None, dense_mean: float | None, kind: str) -> str:
    """The sentence that says, from the interval, whether retrieval survives the Lighthouse phase."""
    if d is None or d["diff"] is None:
        return f"Retrieval of {arm} was not measured (no retrieval source in the config)."
    head = (f"The difference in retrieval accuracy ({arm} minus dense) is "
            f"{_with_interval(d, '.3f').removesuffix(' (no interval)')}")
    if d["lo"] is not None:
        head += f" ({kind})"
    if dense_mean is not None and dense_mean < DENSE_RETRIEVES:
        # Survival needs something to survive: with dense near zero, any interval around zero is vacuous.
        return (f"Whether retrieval survives Lighthouse pre-training is not decided at this scale: dense itself "
                f"retrieves only {dense_mean:.3f} of the values (below {DENSE_RETRIEVES}), so there is no ability "
                f"to lose. {head}.")
    if d["lo"] is None:
        return f"{head}, with no interval (one seed per arm): whether retrieval survives is not decided."
    if d["hi"] < 0:
        return (f"{head}: the interval lies below zero, so retrieval does not survive intact: "
                f"Lighthouse-then-dense loses {-d['hi']:.3f} to {-d['lo']:.3f} of accuracy.")
    if d["lo"] > 0:
        return (f"{head}: the interval lies above zero, so retrieval survives, and Lighthouse-then-dense "
                f"retrieves better than dense by {d['lo']:.3f} to {d['hi']:.3f}.")
    return (f"{head}: the interval contains zero, so retrieval survives within this precision: a loss of more "
            f"than {max(0.0, -d['lo']):.3f} is excluded at 95%.")


def loss_verdict(arm: str, d: dict, kind: str, wall_ratio: float) -> str:
    """The sentence on the final validation loss over all sources, from its difference and interval."""
    if d["lo"] is None:
        where = "above" if d["diff"] > 0 else "below"
        text = f"{d['diff']:+.4f} ({kind}): {arm} ends {where} dense on this one comparison"
    else:
        where = ("worse than dense: the interval lies above zero" if d["lo"] > 0 else
                 "better than dense: the interval lies below zero" if d["hi"] < 0 else
                 "level with dense within the interval, which contains zero")
        text = f"{_with_interval(d, '.4f')} ({kind}): {arm} ends {where}"
    return (f"The final validation loss ({arm} minus dense, all sources) is {text}; training took {wall_ratio:.2f} "
            "of dense's wall-clock (means over seeds).")


def context_verdict(arm: str, d: dict | None, kind: str) -> str | None:
    """The sentence on the use of far context: the arms' difference in (last position bucket minus first)."""
    if d is None or d["diff"] is None:
        return None
    head = (f"Use of far context (the code corpus's loss in the last position bucket minus the first, {arm} minus "
            f"dense) differs by {_with_interval(d, '.4f').removesuffix(' (no interval)')}")
    if d["lo"] is None:
        return f"{head}, with no interval (one seed per arm): not decided."
    if d["lo"] > 0:
        return f"{head} ({kind}): {arm} gains less from far context than dense."
    if d["hi"] < 0:
        return f"{head} ({kind}): {arm} gains more from far context than dense."
    return (f"{head} ({kind}): no difference is detected; a deficit of more than {max(0.0, d['hi']):.4f} "
            "nats is excluded at 95%.")


def switch_verdict(arm: str, spreads: dict) -> str | None:
    """The sentence on the switch to dense: the jump, and where the run ends against its loss before it."""
    lh, dense = spreads[arm], spreads["dense"]
    if "switch/val jump" not in lh:
        return None
    text = (f"At the switch to dense, {arm}'s validation loss jumped by {lh['switch/val jump']['mean']:+.3f}"
            + (f" (its training loss by {lh['switch/train jump']['mean']:+.3f})" if "switch/train jump" in lh else "")
            + f"; its last evaluation is {lh['switch/val end minus before']['mean']:+.3f} against its last "
            "evaluation before the switch")
    if "switch/val end minus before" in dense:
        text += f", where dense moved by {dense['switch/val end minus before']['mean']:+.3f} over the same steps"
    return text + " (means over seeds)."


# What may differ between the runs of one report: the seed, the switch, and where the data was read and
# the run written (the data's content is checked by hash).
PER_RUN_SETTINGS = ("seed", "schedule.lighthouse_steps", "logging.run_dir", "data.path")


def _settings(run: dict) -> dict:
    """The run's resolved config (fields added since it ran take their defaults), flattened to "section.field";
    the mixture's sources as (name, weight) pairs."""
    settings = flat_config(load_config(run["folder"] / "config.yaml").to_dict())
    settings["data.sources"] = [(s["name"], s["weight"]) for s in settings["data.sources"]]
    return settings


def _check_comparable(arms: dict[str, list[dict]]) -> None:
    runs = [r for group in arms.values() for r in group]
    for what, get in (("code corpus", lambda r: r["data"]["content_sha256"]),
                      ("retrieval set", lambda r: (r.get("retrieval_data") or {}).get("content_sha256")),
                      ("steps", lambda r: r["steps"])):
        values = {get(r) for r in runs}
        if len(values) != 1:
            sys.exit(f"reproduce: the runs differ in their {what} ({sorted(map(str, values))})")
    settings = {r["name"]: _settings(r) for r in runs}
    first = runs[0]["name"]
    for name, theirs in settings.items():
        for key in sorted(set(theirs) | set(settings[first])):
            if key not in PER_RUN_SETTINGS and theirs.get(key) != settings[first].get(key):
                sys.exit(f"reproduce: runs {first} and {name} differ in {key} ({settings[first].get(key)!r} and "
                         f"{theirs.get(key)!r}); a report compares runs that differ only in "
                         f"{', '.join(PER_RUN_SETTINGS)}")
    for arm, group in arms.items():
        seeds = [r["seed"] for r in group]
        if len(set(seeds)) != len(seeds):
            sys.exit(f"reproduce: arm {arm} has two runs of one seed ({sorted(seeds)}): "
                     + ", ".join(r["name"] for r in group))


def report_v2(runs: list[dict], out_md: Path, notes_file: str | None = None) -> Path:
    """reproduction_v2.md and reproduction_summary_v2.json beside it (summary_v2_path), and its plots:
    the runs grouped by arm; over seeds each arm's mean and spread, and each Lighthouse arm's difference
    from dense with its 95% interval."""
    arms: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: (-r["lighthouse_steps"] if r["lighthouse_steps"] else 1, r["seed"])):
        arms.setdefault(run["arm"], []).append(run)
    if "dense" not in arms:
        sys.exit(f"reproduce: no dense run (--lighthouse-fraction 0) among {sorted(arms)}")
    arms = {"dense": arms.pop("dense"), **arms}
    _check_comparable(arms)
    # Dense runs are measured around the Lighthouse runs' switch when they all switch at one step.
    switches = {r["lighthouse_steps"] for r in runs if r["lighthouse_steps"]}
    common_switch = next(iter(switches)) if len(switches) == 1 else None
    for run in runs:
        run["metrics"] = run_metrics(run, run["lighthouse_steps"] or common_switch)
    keys = list(dict.fromkeys(k for g in GROUPS for r in runs for k in r["metrics"] if k.startswith(g + "/")))
    by_seed = {arm: {k: {r["seed"]: r["metrics"][k] for r in group if k in r["metrics"]} for k in keys}
               for arm, group in arms.items()}
    spreads = {arm: {k: spread(list(v.values())) for k, v in by_seed[arm].items() if v} for arm in arms}
    diffs = {arm: {k: difference(by_seed["dense"][k], by_seed[arm][k]) for k in keys} for arm in arms if arm != "dense"}
    entries = [{"name": r["name"], "arm": r["arm"], "seed": r["seed"], "lighthouse_steps": r["lighthouse_steps"],
                "retrieval_weight": r.get("retrieval_weight"),
                "final_val": {k.split("/", 1)[1]: v for k, v in r["metrics"].items() if k.startswith("val_loss/")},
                "retrieval_mean": r["metrics"].get("retrieval/mean"), "passkey_mean": r["passkey_eval"]["mean"],
                "train_wall_s": r["wall_s"]["train"], "metrics": r["metrics"]} for g in arms.values() for r in g]
    summary = {"runs": entries, "arms": spreads, "differences": diffs}
    out_md.parent.mkdir(parents=True, exist_ok=True)
    summary_v2_path(out_md).write_text(json.dumps(summary, indent=1))
    notes = Path(notes_file).read_text().strip() if notes_file else ""
    plots = _plots_v2(arms, out_md.parent, out_md.stem + "_")
    out_md.write_text(_markdown_v2(arms, keys, spreads, diffs, notes, plots))
    _log(f"wrote {out_md} ({len(runs)} runs in {len(arms)} arms)")
    return out_md


def _plots_v2(arms: dict[str, list[dict]], out: Path, prefix: str) -> list[str]:
    """Validation loss by step (one line per run, a colour per arm), and per arm the mean loss by position and
    retrieval accuracy by length with their min-max band over seeds; the PNG names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(arms, plt.get_cmap("tab10").colors))
    names = []
    save = _figure_saver(out, prefix, names)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, group in arms.items():
        for i, run in enumerate(group):
            val = _series(run, "val/loss")
            ax.plot([s for s, _, _ in val], [v for _, _, v in val], color=colors[arm], linewidth=1,
                    label=arm if i == 0 else None)
        for k in sorted({r["lighthouse_steps"] for r in group if r["lighthouse_steps"]}):
            ax.axvline(k, color=colors[arm], linestyle=":", linewidth=1)  # the switch to dense
    ax.set(xlabel="step", ylabel="validation loss, all sources (nats/token)",
           title="Validation loss, every run (dotted: the switch to dense)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "val_loss")

    panels = [("position_loss", "position (tokens, bucket middle)", "loss, code corpus (nats/token)",
               "Loss by position, dense attention"),
              ("retrieval/length", "context length (tokens)", "retrieval accuracy", "Retrieval by length")]
    for group_prefix, xlabel, ylabel, title in panels:
        keys = [k for k in arms["dense"][0]["metrics"] if k.startswith(group_prefix)]
        if not keys:
            continue
        x = ([sum(map(int, k.split("/")[1].split("-"))) / 2 for k in keys] if group_prefix == "position_loss"
             else [int(k.split()[-1]) for k in keys])
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for arm, group in arms.items():
            values = [[r["metrics"][k] for r in group] for k in keys]  # [keys][seeds]
            ax.plot(x, [statistics.fmean(v) for v in values], color=colors[arm], marker="o", label=arm)
            ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=colors[arm], alpha=0.2)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title}: mean and min-max over seeds")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, group_prefix.replace("/", "_"))
    return names


def summary_v2_path(out_md: Path) -> Path:
    """The summary JSON beside a report: reproduction_v2.md -> reproduction_summary_v2.json."""
    return out_md.with_name(out_md.stem.removesuffix("_v2") + "_summary_v2.json")


def _switch_steps(runs: list[dict]) -> str:
    """Where the switch table's numbers come from: each Lighthouse run's switch and neighbouring evaluations."""
    parts = []
    for run in runs:
        k = run["lighthouse_steps"]
        if k:
            steps = [int(step) for step, _, _ in _series(run, "val/loss")]
            parts.append(f"{run['name']}: Lighthouse to step {k:,}, evaluations at steps "
                         f"{max(s for s in steps if s <= k):,} and {min(s for s in steps if s > k):,}")
    return "Steps: " + "; ".join(parts) + "."


def _spread_cell(s: dict | None, spec: str) -> str:
    if s is None:
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:{spec}} (1 seed)"
    return f"{s['mean']:{spec}} ± {s['sd']:{spec}} ({s['min']:{spec}}–{s['max']:{spec}})"


def _query_options(settings: dict) -> str:
    """The retrieval set's query form and queries per key in words, empty for the defaults."""
    form, per_key = (settings.get(k, RETRIEVAL_DEFAULTS[k]) for k in ("query_form", "queries_per_key"))
    words = ([f"each queried key asked {per_key} times"] if per_key != 1 else []) + (
        ["queries restating their statements"] if form == "restate" else [])
    return f" ({', '.join(words)})" if words else ""


def _markdown_v2(arms: dict[str, list[dict]], keys: list[str], spreads: dict, diffs: dict, notes: str,
                 plots: list[str]) -> str:
    runs = [r for group in arms.values() for r in group]
    base = runs[0]
    cfg = yaml.safe_load((base["folder"] / "config.yaml").read_text())
    sched, code = cfg["schedule"], base["data"]
    lh_arms = [a for a in arms if a != "dense"]
    kinds = {a: _interval_kind(diffs[a]["val_loss/mixture"], len(arms["dense"]), len(arms[a])) for a in lh_arms}
    lines = [
        "# Lighthouse-then-dense against dense over seeds: end-to-end reproduction, recipe v2",
        "",
        f"Hardware: {'; '.join(sorted({r['hardware'] for r in runs}))}. {_commits(runs)}. Config: `{base['config']}` "
        f"({base['steps']} steps of {_seq_tokens(base):,} tokens; peak LR {cfg['optim']['lr']:g}, "
        f"{sched['warmup_steps']} warmup steps, {sched['decay']} decay to {sched.get('min_lr_ratio', 0.1):g} of "
        "the peak).",
        f"Code corpus: `{code['source']}`; train {code['splits']['train']['documents']:,} documents / "
        f"{code['splits']['train']['tokens']:,} tokens, validation {code['splits']['val']['documents']:,} documents "
        f"(whole documents not in train); content SHA-256 `{code['content_sha256']}`.",
    ]
    if base.get("retrieval_data"):
        rd = base["retrieval_data"]
        st = rd["settings"]
        weights = sorted({r["retrieval_weight"] for r in runs})
        lines.append(
            f"Retrieval set (`lh-data retrieval`, filler from the code corpus): {rd['splits']['train']['documents']:,} "
            f"train and {rd['splits']['val']['documents']:,} held-out documents of {st['doc_tokens']:,} tokens, "
            f"{st['keys']} key/value statements and {st['queries']} queries each{_query_options(st)}; content SHA-256 "
            f"`{rd['content_sha256']}`. Mixture weight of the retrieval set: {', '.join(f'{w:g}' for w in weights)}.")
    lines += ["", "Runs: " + "; ".join(f"**{a}** seeds {', '.join(str(r['seed']) for r in g)}" for a, g in arms.items())
              + ". The arm is the share of the steps trained with Lighthouse before the switch to dense.", ""]
    lines += ["## Verdict", ""]
    for arm in lh_arms:
        dense_retrieval = spreads["dense"].get("retrieval/mean")
        dense_mean = dense_retrieval["mean"] if dense_retrieval else None
        lines.append(f"- {retrieval_verdict(arm, diffs[arm].get('retrieval/mean'), dense_mean, kinds[arm])}")
        wall_ratio = spreads[arm]["wall/train"]["mean"] / spreads["dense"]["wall/train"]["mean"]
        lines.append(f"- {loss_verdict(arm, diffs[arm]['val_loss/mixture'], kinds[arm], wall_ratio)}")
        for sentence in (context_verdict(arm, diffs[arm].get("context_gain/last bucket minus first"), kinds[arm]),
                         switch_verdict(arm, spreads)):
            if sentence:
                lines.append(f"- {sentence}")
    lines += ["", *([notes, ""] if notes else [])]
    lines += [
        "Each cell over seeds: mean ± sample standard deviation (min–max). Differences are Lighthouse-then-dense "
        "minus dense with a 95% t-interval: over the per-seed differences where both arms have two or more "
        "seeds in common (paired by seed), else Welch's unpaired interval; with one seed per arm no interval "
        "is given. Per arm: " + "; ".join(f"{a}: {kinds[a]}" for a in lh_arms) + ".",
        "",
        f"Stability: this recipe replaces the first recipe's constant LR of 1e-3, under which the validation loss "
        f"swung by up to 2.5 nats between neighbouring evaluations, with warmup and {sched['decay']} decay from "
        f"{cfg['optim']['lr']:g}. Here the largest rise of the validation loss between neighbouring evaluations "
        f"of one phase is {max(r['metrics']['stability/largest rise'] for r in runs):.3f} nats over all {len(runs)} "
        "runs (the \"largest rise\" table).",
        "",
    ]
    for group, (title, spec) in GROUPS.items():
        rows = [k for k in keys if k.startswith(group + "/")]
        if not rows:
            continue
        lines += [f"## {title}", "", "| | " + " | ".join(arms) + " | " + " | ".join(f"{a} − dense" for a in lh_arms)
                  + " |", "|---|" + "---|" * (len(arms) + len(lh_arms))]
        for k in rows:
            lines.append(f"| {_label(k)} | " + " | ".join(_spread_cell(spreads[a].get(k), spec) for a in arms) + " | "
                         + " | ".join(_with_interval(diffs[a][k], spec) for a in lh_arms) + " |")
        lines.append("")
        if group == "switch":
            lines += [_switch_steps(runs), ""]
    sources = [k.split("/", 1)[1] for k in keys if k.startswith("val_loss/")]
    lines += ["## Runs", "", "| run | arm | seed | Lighthouse steps | " + " | ".join(f"final val {s}" for s in sources)
              + " | retrieval | pass-key | train wall-clock |", "|---|---|---|---|" + "---|" * (len(sources) + 3)]
    for r in runs:
        m = r["metrics"]
        lines.append(f"| {r['name']} | {r['arm']} | {r['seed']} | {r['lighthouse_steps']} | "
                     + " | ".join(f"{m[f'val_loss/{s}']:.4f}" for s in sources)
                     + f" | {_fmt(m.get('retrieval/mean'), '.3f', '—')} | {m['passkey/mean']:.3f} | "
                     f"{m['wall/train']:.2f} min |")
    return "\n".join(lines + _plots_and_commands(runs, plots))


# ---- command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The parser of the data, train and report commands."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (default: configs/repro-64k-v2.yaml)")
    common.add_argument("--data", help="code corpus folder (default: the config's data.path, or its source "
                                       "named 'code')")
    common.add_argument("--data-roots", nargs="+", help="source trees of the corpus (default: this Python's "
                                                        "site-packages)")
    common.add_argument("--min-doc-tokens", type=int, default=65536, help="shortest document kept (default: 65536)")
    common.add_argument("--val-tokens", type=int, default=2_000_000, help="validation tokens (default: 2,000,000)")
    common.add_argument("--max-docs", type=int, help="stop the corpus after this many documents (default: all)")
    common.add_argument("--tokenizer", default="byte", help="tokenizer of the corpus: 'byte' (default), a Hugging "
                                                            "Face folder or tokenizer.json")
    common.add_argument("--eod-token", help="end-of-document token of that tokenizer (default: its eos)")
    common.add_argument("--retrieval-data", help="retrieval set folder (default: the config's source named "
                                                 "'retrieval')")
    common.add_argument("--retrieval-train-docs", type=int, default=1000,
                        help="train documents of the retrieval set (default: 1000)")
    common.add_argument("--retrieval-val-docs", type=int, default=32,
                        help="held-out documents of the retrieval set (default: 32)")
    # The defaults are the recipe's (benchmarks/results/reproduction_v2_pilots.md says how they were chosen).
    common.add_argument("--retrieval-keys", type=int, default=128, help="statements per document (default: 128)")
    common.add_argument("--retrieval-queries", type=int, default=64, help="keys queried per document (default: 64)")
    common.add_argument("--retrieval-query-form", choices=("assert", "restate"), default="restate",
                        help="lh-data retrieval --query-form: 'restate' repeats the statement as the query "
                             "(default: restate)")
    common.add_argument("--retrieval-queries-per-key", type=int, default=4,
                        help="lh-data retrieval --queries-per-key: queries of each queried key (default: 4)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("data", parents=[common], help="build the code corpus (and the retrieval set) if missing")
    tr = commands.add_parser("train", parents=[common], help="one training, its evaluations and its results folder")
    tr.add_argument("name", help="run name, e.g. dense or lh60")
    tr.add_argument("--lighthouse-fraction", type=float, required=True,
                    help="share of the steps trained with Lighthouse before the switch to dense (0: dense run)")
    tr.add_argument("--seed", type=int, help="the run's seed: initial weights, data order, mixture draws "
                                             "(default: the config's seed)")
    tr.add_argument("--retrieval-weight", type=float, default=0.5,
                    help="mixture weight of the retrieval set, the code corpus getting the rest (default: 0.5)")
    tr.add_argument("--steps", type=int, help="training steps (default: the config's schedule.steps)")
    tr.add_argument("--retrieval-docs", type=int, default=16, help="held-out documents per length of lh-eval "
                                                                   "retrieval (default: 16)")
    tr.add_argument("--retrieval-lengths", help="lh-eval retrieval --lengths (default: its own, from seq_len)")
    tr.add_argument("--eval-batches", type=int, default=16, help="batches of the final lh-eval loss (default: 16)")
    tr.add_argument("--passkey-lengths", help="lh-eval passkey --lengths (default: its own, scaled to seq_len)")
    tr.add_argument("--loss-buckets", type=int, default=8, help="position buckets of lh-eval loss (default: 8)")
    tr.add_argument("--loss-spacing", default="log", choices=("linear", "log"),
                    help="their widths: octaves (default) or equal")
    tr.add_argument("--init-from", help="start from these weights (lh-train --init-from), e.g. an imported model")
    tr.add_argument("--results", default=str(DEFAULT_RESULTS),
                    help="results root (default: runs/reproduce-v2/results)")
    tr.add_argument("--work", default=str(DEFAULT_WORK),
                    help="scratch run directories (default: runs/reproduce-v2/work)")
    tr.add_argument("overrides", nargs="*", help="extra lh-train overrides section.field=value")
    rep = commands.add_parser("report", help="the report over every run in --results")
    rep.add_argument("--results", default=str(DEFAULT_RESULTS),
                     help="results root (default: runs/reproduce-v2/results)")
    rep.add_argument("--out", help="report file; its summary JSON (and plots) go beside it (default: "
                                   "benchmarks/results/reproduction_v2.md, or reproduction.md for runs recorded "
                                   "without a seed)")
    rep.add_argument("--notes", help="a markdown file of observations to include in the report")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options, where argparse no longer fills the positional list.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or args.command != "train"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "train":
        args.overrides += extra
    if args.command == "data":
        ensure_data(args)
    elif args.command == "train":
        train(args)
    else:
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
