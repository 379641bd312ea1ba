"""Context extension of a pretrained model: dense against Lighthouse-then-dense, on one GPU.

    python benchmarks/extend.py prepare --hf /path/to/SmolLM2-135M-Instruct   # import, corpus, the original's evals
    python benchmarks/extend.py train dense --lighthouse-fraction 0
    python benchmarks/extend.py train lh60  --lighthouse-fraction 0.6
    python benchmarks/extend.py report                                        # -> benchmarks/results/extension.md

`prepare` imports the Hugging Face model (`lh-import`), builds the corpus with the model's own
tokenizer (Python sources of this interpreter's site-packages, one document per directory, documents
of at least 64K tokens, whole held-out documents for validation) and evaluates the original model at
the extended length: loss by position in octave buckets and pass-key retrieval. `train` is
benchmarks/reproduce.py's `train` started from the imported weights (`lh-train --init-from`) with
configs/extend-smollm2-64k.yaml; runs differ only in schedule.lighthouse_steps. `report` compares the
original model, the dense extension and each Lighthouse-then-dense extension.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import reproduce

from lh_dist.config import load_config

ROOT = reproduce.ROOT
DEFAULT_CONFIG = ROOT / "configs" / "extend-smollm2-64k.yaml"
DEFAULT_WORK = ROOT / "runs" / "extend" / "work"
DEFAULT_RESULTS = ROOT / "runs" / "extend" / "results"
PASSKEY_LENGTHS = "4096,8192,16384,32768,65536"
LOSS_BUCKETS = 7  # octaves: 0-1K, 1-2K, ..., 32-64K at 65,536 tokens
ORIGINAL = "original"


def _import_dir(args) -> Path:
    return Path(args.work) / "import"


def _use_model_tokenizer(args) -> None:
    """The corpus is tokenized with the imported model's own tokenizer (the copy lh-import keeps)."""
    args.tokenizer = str(_import_dir(args) / "hf")


def prepare(args) -> Path:
    """Import the model, build the corpus, evaluate the original model; returns its results folder."""
    imported = _import_dir(args)
    if not (imported / "config.yaml").is_file():
        reproduce._run([sys.executable, "-m", "lh_dist.hf.importer", str(args.hf), "--out", str(imported)])
    _use_model_tokenizer(args)
    data_info = reproduce.ensure_data(args)
    seq_len = load_config(args.config, args.overrides).data.seq_len
    out = Path(args.results) / ORIGINAL
    out.mkdir(parents=True, exist_ok=True)
    data = str(reproduce._data_path(args))
    loss_cmd = [sys.executable, "-m", "lh_dist.eval.cli", "loss", str(imported), "--seq-len", str(seq_len),
                "--data", data, "--batches", str(args.eval_batches), "--buckets", str(LOSS_BUCKETS),
                "--spacing", "log", "--out", str(out / "eval_loss")]
    passkey_cmd = [sys.executable, "-m", "lh_dist.eval.cli", "passkey", str(imported), "--lengths",
                   args.passkey_lengths, "--out", str(out / "eval_passkey"), f"data.path={data}"]
    wall = {"eval_loss": reproduce._run(loss_cmd, out / "eval_loss.log"),
            "eval_passkey": reproduce._run(passkey_cmd, out / "eval_passkey.log")}
    record = {"name": ORIGINAL, "commit": reproduce._commit(), "hardware": reproduce._hardware(),
              "model": str(args.hf), "data": {k: data_info.get(k) for k in ("source", "splits", "content_sha256")},
              "invocation": ["python", "benchmarks/extend.py", *sys.argv[1:]],
              "commands": {"eval_loss": loss_cmd, "eval_passkey": passkey_cmd}, "wall_s": wall,
              "finished": time.time()}
    (out / "run.json").write_text(json.dumps(record, indent=1))
    reproduce._log(f"original model: wrote {out}")
    return out


def train(args) -> Path:
    """One extension run (reproduce.py's `train`, from the imported weights)."""
    if not (_import_dir(args) / "config.yaml").is_file():
        sys.exit(f"extend: no imported model in {_import_dir(args)}: run `extend.py prepare --hf DIR` first")
    _use_model_tokenizer(args)
    args.init_from = str(_import_dir(args))
    args.loss_buckets, args.loss_spacing = LOSS_BUCKETS, "log"
    return reproduce.train(args)


def _load_original(folder: Path) -> dict:
    run = json.loads((folder / "run.json").read_text())
    run["loss_eval"] = reproduce._eval_json(folder / "eval_loss")
    run["passkey_eval"] = reproduce._eval_json(folder / "eval_passkey")
    return run


def report(args) -> Path:
    """extension.md and its plots from every run in --results."""
    results = Path(args.results)
    if not (results / ORIGINAL / "run.json").is_file():
        sys.exit(f"extend: no evaluation of the original model in {results} (run `extend.py prepare` first)")
    original = _load_original(results / ORIGINAL)
    runs = [reproduce.load_run(p.parent) for p in sorted(results.glob("*/run.json")) if p.parent.name != ORIGINAL]
    dense = [r for r in runs if r["lighthouse_steps"] == 0]
    if len(dense) != 1:
        sys.exit(f"extend: need exactly one dense extension (lighthouse_steps 0) in {results}, found {len(dense)}")
    runs = dense + sorted((r for r in runs if r is not dense[0]), key=lambda r: -r["lighthouse_steps"])
    hashes = {r["data"]["content_sha256"] for r in [original, *runs]}
    if len(hashes) != 1:
        sys.exit(f"extend: the runs were trained or evaluated on different data (content hashes {sorted(hashes)})")
    # Short runs evaluate a few times only: the last evaluation alone is the final loss (a mean of
    # several would reach back into the Lighthouse phase).
    base = reproduce.summarize(runs[0], last=1)
    summaries = [base] + [reproduce.summarize(r, runs[0], base, last=1) for r in runs[1:]]

    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    prefix = out_md.stem + "_"
    models = [(f"{ORIGINAL} (8K)", original)] + [(r["name"], r) for r in runs]
    reproduce.plot_position_loss([(name, m["loss_eval"]) for name, m in models], out_md.parent /
                                 f"{prefix}position_loss.png", "nats/token", log_x=True)
    reproduce.plot_passkey([(name, m["passkey_eval"]) for name, m in models], out_md.parent / f"{prefix}passkey.png")
    _plot_val_loss(runs, out_md.parent / f"{prefix}val_loss.png")
    (out_md.parent / f"{prefix}summary.json").write_text(json.dumps(
        {"original": {"eval_loss": original["loss_eval"]["loss"], "passkey_mean": original["passkey_eval"]["mean"]},
         "runs": summaries}, indent=1))
    notes = Path(args.notes).read_text().strip() if args.notes else ""
    out_md.write_text(_markdown(original, runs, summaries, prefix, notes))
    reproduce._log(f"wrote {out_md}")
    return out_md


def _plot_val_loss(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, run in enumerate(runs):
        val = reproduce._series(run, "val/loss")
        color = plt.get_cmap("tab10").colors[i]
        axes[0].plot([s for s, _, _ in val], [v for _, _, v in val], color=color, marker=".", label=run["name"])
        axes[1].plot([(w - run["train_started"]) / 60 for _, w, _ in val], [v for _, _, v in val], color=color,
                     marker=".", label=run["name"])
        if run["lighthouse_steps"]:
            axes[0].axvline(run["lighthouse_steps"], color=color, linestyle=":", linewidth=1)
    axes[0].set(xlabel="step", ylabel="validation loss (nats/token)", title="Validation loss at 64K by step")
    axes[1].set(xlabel="wall-clock since start (min)", ylabel="validation loss (nats/token)",
                title="Validation loss at 64K by wall-clock")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(original: dict, runs: list[dict], summaries: list[dict], prefix: str, notes: str) -> str:
    dense, sd = runs[0], summaries[0]
    splits = dense["data"]["splits"]
    seq_len = reproduce._seq_tokens(dense)
    lines = [
        "# Extending a pretrained model's context: dense against Lighthouse-then-dense",
        "",
        f"Model: `{original['model']}` (imported with `lh-import`). Hardware: {dense['hardware']}. "
        f"{reproduce._commits([original, *runs])}. Config: `{dense['config']}` ({dense['steps']} steps of "
        f"{seq_len:,} tokens, started from the imported weights with `lh-train --init-from`).",
        f"Data: `{dense['data']['source']}`, tokenized with the model's tokenizer; train "
        f"{splits['train']['documents']:,} documents / {splits['train']['tokens']:,} tokens, validation "
        f"{splits['val']['documents']:,} documents / {splits['val']['tokens']:,} tokens (whole documents not in "
        f"train); content SHA-256 `{dense['data']['content_sha256']}`.",
        "",
    ]
    for s in summaries[1:]:
        reached = s["reached_baseline_final"]
        lines.append(
            f"- **{s['name']}** (Lighthouse for {s['lighthouse_steps']} of {s['steps']} steps) ends "
            f"{s['final_val']:.4f} against dense's {sd['final_val']:.4f} ({s['final_val_diff']:+.4f}) "
            + (f"and reaches dense's final loss at step {reached['step']} after {reached['wall_s'] / 60:.2f} min "
               f"(dense's whole run: {sd['train_wall_s'] / 60:.2f} min)" if reached
               else "and does not reach dense's final loss")
            + f"; its training took {s['train_wall_s'] / sd['train_wall_s']:.2f} of dense's wall-clock.")
    lines += ["", *([notes, ""] if notes else []),
              "| model | final val loss | lh-eval loss (dense attn) | pass-key mean | train wall-clock |"
              " reaches dense's final loss | tokens/s Lighthouse | tokens/s dense |",
              "|---|---|---|---|---|---|---|---|",
              f"| {ORIGINAL} (trained to 8K) | — | {original['loss_eval']['loss']:.4f} | "
              f"{original['passkey_eval']['mean']:.3f} | — | — | — | — |"]
    for s in summaries:
        reached = s.get("reached_baseline_final")
        tps = s["tokens_per_s"]
        lines.append(
            f"| {s['name']} | {s['final_val']:.4f} | {s['eval_loss']:.4f} | {s['passkey_mean']:.3f} | "
            f"{s['train_wall_s'] / 60:.2f} min | "
            + ("—" if s is sd else (f"step {reached['step']}, {reached['wall_s'] / 60:.2f} min" if reached
                                    else "not reached"))
            + f" | {reproduce._fmt(tps['lighthouse'], ',.0f', '—')} | {reproduce._fmt(tps['dense'], ',.0f', '—')} |")
    buckets = original["loss_eval"]["buckets"]
    lines += ["", "## Loss by position on held-out documents (nats/token, ± standard error over sequences)", "",
              "| model | " + " | ".join(f"{_k(b['start'])}–{_k(b['end'])}" for b in buckets) + " |",
              "|---|" + "---|" * len(buckets)]
    for name, result in [(ORIGINAL, original["loss_eval"])] + [(r["name"], r["loss_eval"]) for r in runs]:
        lines.append(f"| {name} | " + " | ".join(
            f"{b['loss']:.3f} ± {b['stderr']:.3f}" if b.get("stderr") is not None else f"{b['loss']:.3f}"
            for b in result["buckets"]) + " |")
    lines += ["", f"![position loss]({prefix}position_loss.png)", "", f"![pass-key]({prefix}passkey.png)", "",
              f"![validation loss]({prefix}val_loss.png)", "",
              "Wall-clock is measured from the start of `lh-train` (startup and compilation included); tokens/s are "
              "medians of the logged steps of each phase. Only evaluations in the dense phase count toward reaching "
              "dense's final loss.", "", "## Commands", "", "```"]
    lines += [" ".join(original["invocation"])] + ["#   " + " ".join(["python"] + c[1:])
                                                   for c in original["commands"].values()]
    for run in runs:
        lines += [" ".join(run["invocation"])] + ["#   " + " ".join(["python"] + c[1:])
                                                  for c in run["commands"].values()]
    lines += ["python benchmarks/extend.py report", "```", ""]
    return "\n".join(lines)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (default: "
                                                                      "configs/extend-smollm2-64k.yaml)")
    common.add_argument("--data", help="dataset folder (default: the config's data.path)")
    common.add_argument("--data-roots", nargs="+", help="source trees of the corpus (default: this Python's "
                                                        "site-packages)")
    common.add_argument("--min-doc-tokens", type=int, default=65536, help="shortest document kept (default: 65536)")
    # 16 validation samples of 65,537 tokens (configs/extend-smollm2-64k.yaml's logging.eval_batches) and a margin.
    common.add_argument("--val-tokens", type=int, default=1_200_000, help="validation tokens (default: 1,200,000)")
    common.add_argument("--max-docs", type=int, default=600, help="documents in the corpus (default: 600)")
    common.add_argument("--eod-token", default="<|endoftext|>",
                        help="end-of-document token (default: <|endoftext|>, the pre-training separator of SmolLM2)")
    common.add_argument("--work", default=str(DEFAULT_WORK), help="imported model and run directories "
                                                                  "(default: runs/extend/work)")
    common.add_argument("--results", default=str(DEFAULT_RESULTS), help="results root (default: runs/extend/results)")
    common.add_argument("--eval-batches", type=int, default=16, help="sequences of lh-eval loss (default: 16)")
    common.add_argument("--passkey-lengths", default=PASSKEY_LENGTHS, help=f"default: {PASSKEY_LENGTHS}")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", parents=[common], help="import, corpus, evaluation of the original")
    prep.add_argument("--hf", type=Path, required=True, help="the Hugging Face model folder")
    # prepare takes section.field=value overrides too: the ones that set the evaluated length (data.seq_len).
    tr = commands.add_parser("train", parents=[common], help="one extension run with its evaluations")
    tr.add_argument("name", help="run name, e.g. dense or lh60")
    tr.add_argument("--lighthouse-fraction", type=float, required=True,
                    help="share of the steps trained with Lighthouse before the switch to dense (0: dense run)")
    tr.add_argument("--steps", type=int, help="training steps (default: the config's schedule.steps)")
    rep = commands.add_parser("report", parents=[common], help="the report over every run in --results")
    rep.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extension.md"),
                     help="report file; plots go beside it (default: benchmarks/results/extension.md)")
    rep.add_argument("--notes", help="a markdown file of observations to include in the report")
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or args.command == "report"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = extra
    {"prepare": prepare, "train": train, "report": report}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
