"""The end-to-end comparison: Lighthouse-then-dense against dense, same weights budget, same data.

One training per invocation, so that each fits a time-limited job; then a report over all runs:

    python benchmarks/reproduce.py data                          # build the corpus if missing
    python benchmarks/reproduce.py train dense --lighthouse-fraction 0
    python benchmarks/reproduce.py train lh60  --lighthouse-fraction 0.6
    python benchmarks/reproduce.py train lh40  --lighthouse-fraction 0.4
    python benchmarks/reproduce.py report                        # -> benchmarks/results/reproduction.md

`train` builds the data if missing, runs `lh-train` (config: configs/repro-64k.yaml, with
schedule.lighthouse_steps set from the fraction), then `lh-eval loss` and `lh-eval passkey` on the
final checkpoint, and leaves everything a report needs in `<results>/<name>/` (a few MB, no
checkpoints): run.json (commands, commit, hardware, data, wall-clock), scalars.json (every
TensorBoard scalar with its step and wall time), the event files, train.log and the two evals.
`report` reads every `<results>/*/run.json`; the run with no Lighthouse steps is the baseline.

The corpus is the Python sources installed beside the interpreter (its site-packages), one
document per directory, documents of at least 64K tokens, 2M validation tokens:
`lh-data tree --include '*.py' --min-doc-tokens 65536 --val-tokens 2000000 <site-packages>`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "repro-64k.yaml"
DEFAULT_RESULTS = ROOT / "runs" / "reproduce" / "results"
DEFAULT_WORK = ROOT / "runs" / "reproduce" / "work"
CLOSE = 0.02  # "back within 0.02 nats of dense"


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


def _data_path(args) -> Path:
    path = Path(args.data or _config(args)["data"]["path"])
    return path if path.is_absolute() else ROOT / path


# ---- data -----------------------------------------------------------------------------------

def ensure_data(args) -> dict:
    """Build the corpus unless `lh_data.json` already marks a complete one; returns its info."""
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
    return json.loads(info_file.read_text())


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


def train(args) -> Path:
    cfg = _config(args)
    steps = int(args.steps or cfg["schedule"]["steps"])
    if not 0 <= args.lighthouse_fraction < 1:
        sys.exit(f"reproduce: --lighthouse-fraction must be in [0, 1), got {args.lighthouse_fraction}")
    interval = int(cfg["logging"]["log_interval"])
    # The switch falls on a logged step, so each phase's wall-clock is read off the log.
    lighthouse_steps = round(args.lighthouse_fraction * steps / interval) * interval
    data_info = ensure_data(args)

    out = Path(args.results) / args.name
    run_dir = Path(args.work) / args.name
    for folder in (out, run_dir):
        shutil.rmtree(folder, ignore_errors=True)
    out.mkdir(parents=True)
    overrides = [f"logging.run_dir={run_dir}", f"data.path={_data_path(args)}", f"schedule.steps={steps}",
                 f"schedule.lighthouse_steps={lighthouse_steps}", *args.overrides]
    init = ["--init-from", str(args.init_from)] if args.init_from else []
    train_cmd = [sys.executable, "-m", "lh_dist.train.cli", "--config", str(args.config), *init, *overrides]
    loss_cmd = [sys.executable, "-m", "lh_dist.eval.cli", "loss", str(run_dir), "--batches", str(args.eval_batches),
                "--buckets", str(args.loss_buckets), "--spacing", args.loss_spacing, "--out", str(out / "eval_loss")]
    passkey_cmd = [sys.executable, "-m", "lh_dist.eval.cli", "passkey", str(run_dir), "--out", str(out / "eval_passkey")]
    if args.passkey_lengths:
        passkey_cmd += ["--lengths", args.passkey_lengths]

    started = time.time()
    train_s = _run(train_cmd, out / "train.log")
    loss_s = _run(loss_cmd, out / "eval_loss.log")
    passkey_s = _run(passkey_cmd, out / "eval_passkey.log")

    (out / "scalars.json").write_text(json.dumps(read_scalars(run_dir / "tensorboard")))
    shutil.copytree(run_dir / "tensorboard", out / "tensorboard")
    shutil.copy(run_dir / "config.yaml", out / "config.yaml")
    record = {
        "name": args.name, "steps": steps, "lighthouse_steps": lighthouse_steps,
        "commit": _commit(), "hardware": _hardware(), "config": os.path.relpath(Path(args.config).resolve(), ROOT),
        "data": {k: data_info.get(k) for k in ("source", "splits", "content_sha256", "min_doc_tokens", "validation")},
        # The script the user ran (extend.py runs this function too).
        "invocation": ["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]],
        "commands": {"train": train_cmd, "eval_loss": loss_cmd, "eval_passkey": passkey_cmd},
        "train_started": started, "wall_s": {"train": train_s, "eval_loss": loss_s, "eval_passkey": passkey_s,
                                             "total": time.time() - started},
    }
    (out / "run.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(run_dir)  # checkpoints stay out of the results
    _log(f"{args.name}: wrote {out} (train {train_s:.0f} s, total {record['wall_s']['total']:.0f} s)")
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
        before = [v for step, _, v in val if step <= k]
        after = [(int(step), v) for step, _, v in val if step > k]
        s["switch_spike"] = after[0][1] - before[-1] if before and after else None
        back = [step for step, v in after if step in base_val and v <= base_val[step] + CLOSE]
        s["steps_to_within_close"] = back[0] - k if back else None
    return s


def _fmt(value, spec: str, none: str = "not reached") -> str:
    return none if value is None else format(value, spec)


def _plots(runs: list[dict], out: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{name}.png", dpi=110)
        plt.close(fig)
        names.append(f"{prefix}{name}.png")

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
    folders = sorted(p.parent for p in Path(args.results).glob("*/run.json"))
    if not folders:
        sys.exit(f"reproduce: no runs in {args.results} (run `reproduce.py train` first)")
    runs = [load_run(f) for f in folders]
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
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Commands", "", "Each run, and what it ran (`python` is the interpreter that ran the script):",
              "", "```"]
    for run in runs:
        lines += [f"# {run['name']}", " ".join(run["invocation"])]
        lines += ["#   " + " ".join(["python"] + c[1:]) for c in run["commands"].values()]
    lines += ["python benchmarks/reproduce.py report", "```", ""]
    return "\n".join(lines)


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


# ---- command line ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (default: configs/repro-64k.yaml)")
    common.add_argument("--data", help="dataset folder (default: the config's data.path)")
    common.add_argument("--data-roots", nargs="+", help="source trees of the corpus (default: this Python's "
                                                        "site-packages)")
    common.add_argument("--min-doc-tokens", type=int, default=65536, help="shortest document kept (default: 65536)")
    common.add_argument("--val-tokens", type=int, default=2_000_000, help="validation tokens (default: 2,000,000)")
    common.add_argument("--max-docs", type=int, help="stop the corpus after this many documents (default: all)")
    common.add_argument("--tokenizer", default="byte", help="tokenizer of the corpus: 'byte' (default), a Hugging "
                                                            "Face folder or tokenizer.json")
    common.add_argument("--eod-token", help="end-of-document token of that tokenizer (default: its eos)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("data", parents=[common], help="build the corpus if missing")
    tr = commands.add_parser("train", parents=[common], help="one training, its evaluations and its results folder")
    tr.add_argument("name", help="run name, e.g. dense or lh60")
    tr.add_argument("--lighthouse-fraction", type=float, required=True,
                    help="share of the steps trained with Lighthouse before the switch to dense (0: dense run)")
    tr.add_argument("--steps", type=int, help="training steps (default: the config's schedule.steps)")
    tr.add_argument("--eval-batches", type=int, default=16, help="batches of the final lh-eval loss (default: 16)")
    tr.add_argument("--passkey-lengths", help="lh-eval passkey --lengths (default: its own, scaled to seq_len)")
    tr.add_argument("--loss-buckets", type=int, default=8, help="position buckets of lh-eval loss (default: 8)")
    tr.add_argument("--loss-spacing", default="linear", choices=("linear", "log"),
                    help="their widths: equal (default) or octaves")
    tr.add_argument("--init-from", help="start from these weights (lh-train --init-from), e.g. an imported model")
    tr.add_argument("--results", default=str(DEFAULT_RESULTS), help="results root (default: runs/reproduce/results)")
    tr.add_argument("--work", default=str(DEFAULT_WORK), help="scratch run directories (default: runs/reproduce/work)")
    tr.add_argument("overrides", nargs="*", help="extra lh-train overrides section.field=value")
    rep = commands.add_parser("report", help="the report over every run in --results")
    rep.add_argument("--results", default=str(DEFAULT_RESULTS), help="results root (default: runs/reproduce/results)")
    rep.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reproduction.md"),
                     help="report file; plots go beside it (default: benchmarks/results/reproduction.md)")
    rep.add_argument("--notes", help="a markdown file of observations to include in the report")
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
