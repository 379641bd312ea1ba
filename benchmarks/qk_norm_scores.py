"""Which vectors Lighthouse should score in a model with QK-norm: measured on a small trained model.

    python benchmarks/qk_norm_scores.py --out benchmarks/results   # 2 CPU cores: 10-20 min (training 614K tokens)
    python benchmarks/qk_norm_scores.py --steps 4 --val-samples 4 --out /tmp/qk   # checks the script

With QK-norm (Qwen3) every q and k is RMS-normalized before RoPE, so its L2 norm is ||w * x_hat||:
it varies over tokens only as much as the gain w is uneven. The norm scorer then reads next to
constant scores. This script

1. builds a byte-level dataset of standard-library sources with `lh-data stdlib` and trains a
   small QK-norm model on it, densely, with `lh-train` (one CPU process; --work keeps both, and a
   later call with the same --work reuses them);
2. on held-out validation sequences, with the same weights, measures the loss of: dense attention;
   Lighthouse scoring the projections before the norm (the model's score inputs); Lighthouse scoring
   the normalized q/k (trained gains), or the normalized q/k with unit gains (a fresh QK-norm);
   Lighthouse with constant scores (selection by tie-breaking: the lowest windows of each tile).
   Lighthouse runs in every layer, with levels/pooling/topk such that a quarter of the sequence is
   refined to single tokens;
3. reports the spread of the per-token scores (coefficient of variation over the tokens of a
   sequence, per layer and head) before the norm, after it with the trained gains and after it with
   unit gains (a fresh QK-norm), for the trained model and for a freshly initialized one; and the
   share of the selected entries that scoring the normalized vectors or constant scores has in
   common with scoring the projections.

Numbers are means over validation sequences with their standard errors (std / sqrt(n)); loss
differences are paired (the same sequences). Writes <out>/qk_norm_scores.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from lh_dist.assembly.model import PhasedAttention, build_model, set_phase
from lh_dist.checkpoint.format import checkpoint_config, load_model_state, resolve_checkpoint
from lh_dist.data.loader import PackedLoader
from lh_dist.ops.lighthouse import LighthouseParams, lighthouse_select

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("dense", "projections", "normalized", "unit_gain", "constant")


def run_config(args) -> dict:
    """The lh-train config of the model trained here (a small QK-norm model, dense throughout)."""
    return {
        "model": {"dim": args.dim, "n_layers": args.layers, "n_heads": 4, "n_kv_heads": 2,
                  "ffn_hidden": args.dim * 11 // 4, "vocab_size": 257, "qk_norm": True},
        # At N = 1024, one tile: 256 coarsest windows of 4 tokens, 128 of them refined into windows of
        # 2 tokens, 128 of those into single tokens (a quarter of the sequence).
        "lighthouse": {"levels": 3, "pooling": 2, "topk": 128, "dense_layers": [], "backend": "reference"},
        "device": "cpu",
        "data": {"path": str(args.work / "data"), "seq_len": args.seq_len, "micro_batch": args.micro_batch},
        "optim": {"lr": 3.0e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"steps": args.steps, "warmup_steps": max(1, args.steps // 10), "decay": "cosine",
                     "min_lr_ratio": 0.1, "lighthouse_steps": 0},
        "checkpoint": {"interval": args.steps, "keep": 1},
        "logging": {"run_dir": str(args.work / "run"), "log_interval": max(1, args.steps // 10),
                    "eval_interval": args.steps, "eval_batches": 2},
    }


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def prepare(args) -> tuple[Path, bool]:
    """The dataset and the trained run, built unless --work holds them: (checkpoint folder, trained here)."""
    data, run = args.work / "data", args.work / "run"
    if not (data / "lh_data.json").is_file():
        _run([sys.executable, "-m", "lh_dist.data.cli", "stdlib", "--out", str(data), "--max-docs", "400",
              "--val-fraction", "0.1", "--overwrite"])
    config = args.work / "config.yaml"
    wanted = yaml.safe_dump(run_config(args))
    train = not config.is_file() or config.read_text() != wanted or not (run / "checkpoints").is_dir()
    if train:
        config.write_text(wanted)
        _run([sys.executable, "-m", "lh_dist.train.cli", "--config", str(config), "--resume", "none", "--overwrite"])
    return resolve_checkpoint(run), train


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


class Probe:
    """Captures each layer's q/k before and after QK-norm (forward hooks on q_norm / k_norm)."""

    def __init__(self, model):
        self.pre: dict[str, torch.Tensor] = {}
        self.weight: dict[str, torch.Tensor] = {}
        self.eps: dict[str, float] = {}
        self.handles = []
        for i, layer in enumerate(model.layers):
            for name in ("q_norm", "k_norm"):
                norm = getattr(layer.attention, name)
                key = f"{i}.{name[0]}"
                self.weight[key], self.eps[key] = norm.weight.detach(), norm.eps
                self.handles.append(norm.register_forward_hook(self._keep(key)))

    def _keep(self, key):
        def hook(module, inputs, output):
            self.pre[key] = inputs[0].detach().float()  # [B, N, heads, D]

        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def spreads(self) -> dict[str, float]:
        """Mean over layers and heads of std/mean of the per-token norms: before the norm, after it
        with the trained gains, after it with unit gains."""
        out = {"pre": [], "post": [], "post_unit_gain": []}
        for key, x in self.pre.items():
            x_hat = _unit_gain(x, self.eps[key])
            for name, vectors in (("pre", x), ("post", x_hat * self.weight[key]), ("post_unit_gain", x_hat)):
                norms = vectors.norm(dim=-1)  # [B, N, heads]
                out[name].append((norms.std(1) / norms.mean(1)).mean().item())
        return {k: sum(v) / len(v) for k, v in out.items()}


def _unit_gain(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., D] without its gain: what a fresh QK-norm (w = 1) makes of it."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _with_scores(original, how: str, eps: float):
    """A Lighthouse function that scores what `how` says instead of the projections the model passes."""
    if how == "normalized":  # the q/k it attends with
        return lambda q, k, v, score_q=None, score_k=None: original(q, k, v)
    if how == "unit_gain":
        return lambda q, k, v, score_q=None, score_k=None: original(
            q, k, v, score_q=_unit_gain(score_q, eps), score_k=_unit_gain(score_k, eps))
    return lambda q, k, v, score_q=None, score_k=None: original(
        q, k, v, score_q=torch.ones_like(q), score_k=torch.ones_like(k))


def _overlap(a, b) -> float:
    """Share of the gathered entries that two selections have in common."""
    both = ((a.inverse >= 0) & (b.inverse >= 0)).sum().item()
    return both / a.index.numel()


def evaluate(model, samples: list[torch.Tensor], params: LighthouseParams) -> dict:
    """Per-sample losses of every variant, score spreads and selection overlaps."""
    attentions = [m for m in model.modules() if isinstance(m, PhasedAttention)]
    originals = [m.lighthouse_fn for m in attentions]
    probe = Probe(model)
    losses = {v: [] for v in VARIANTS}
    spreads, overlaps = [], {"normalized": [], "unit_gain": [], "constant": []}
    n = samples[0].shape[1] - 1
    positions = torch.arange(n)
    with torch.no_grad():
        for sample in samples:
            inputs, targets = sample[:, :-1], sample[:, 1:]
            for variant in VARIANTS:
                set_phase(model, "dense" if variant == "dense" else "lighthouse")
                for m, original in zip(attentions, originals):
                    keep = variant in ("dense", "projections")
                    m.lighthouse_fn = original if keep else _with_scores(original, variant, model.cfg.norm_eps)
                losses[variant].append(model(inputs, positions, targets).mean().item())
                if variant == "projections":
                    spreads.append(probe.spreads())
                    for i in range(len(model.layers)):
                        sq, sk = probe.pre[f"{i}.q"], probe.pre[f"{i}.k"]
                        layer = model.layers[i].attention
                        chosen = lighthouse_select(sq, sk, params)
                        others = {"normalized": (layer.q_norm(sq), layer.k_norm(sk)),
                                  "unit_gain": (_unit_gain(sq, layer.q_norm.eps), _unit_gain(sk, layer.k_norm.eps)),
                                  "constant": (torch.ones_like(sq), torch.ones_like(sk))}
                        for name, (oq, ok) in others.items():
                            overlaps[name].append(_overlap(chosen, lighthouse_select(oq, ok, params)))
        for m, original in zip(attentions, originals):
            m.lighthouse_fn = original
    probe.close()
    result = {"loss": {v: _mean_se(x) for v, x in losses.items()},
              "loss_minus_projections": {v: _mean_se([a - b for a, b in zip(losses[v], losses["projections"])])
                                         for v in VARIANTS if v != "projections"},
              "score_cv": {k: _mean_se([s[k] for s in spreads]) for k in spreads[0]},
              "selection_overlap_with_projections": {k: _mean_se(v) for k, v in overlaps.items()},
              "per_sample_loss": losses}
    return result


def fresh_spreads(cfg, samples: list[torch.Tensor]) -> dict:
    """Score spreads of a freshly initialized model of the same shape (unit gains)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    probe = Probe(model)
    spreads = []
    n = samples[0].shape[1] - 1
    with torch.no_grad():
        for sample in samples:
            model(sample[:, :-1], torch.arange(n), sample[:, 1:])
            spreads.append(probe.spreads())
    probe.close()
    return {k: _mean_se([s[k] for s in spreads]) for k in spreads[0]}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _pm(pair, digits=4) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _pm_sig(pair) -> str:
    """mean ± se with 3 significant digits (spreads span five orders of magnitude)."""
    return f"{pair[0]:.3g} ± {pair[1]:.2g}"


def write_report(out: Path, result: dict, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "qk_norm_scores.json").write_text(json.dumps(result, indent=1) + "\n")
    r, m = result, result["model"]
    lines = [
        "# Lighthouse scores under QK-norm: projections against normalized q/k",
        "",
        f"Generated by `{command}` (commit {r['commit']}, torch {r['torch']}, {r['machine']}, "
        f"{r['seconds']:.0f} s{'' if r['trained_here'] else ', evaluation only: the trained run was reused'}).",
        "",
        f"Model: byte-level, dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads ({m['n_kv_heads']} KV), "
        f"head dim {m['head_dim']}, QK-norm; trained densely by `lh-train` for {r['steps']} steps of "
        f"{r['tokens_per_step']:,} tokens on standard-library sources (`lh-data stdlib`). Evaluated on "
        f"{r['val_samples']} held-out validation sequences of {r['seq_len']} tokens, the same weights in every "
        f"row. Lighthouse in every layer: levels {r['lighthouse']['levels']}, pooling "
        f"{r['lighthouse']['pooling']}, topk {r['lighthouse']['topk']} (gathered length "
        f"{r['lighthouse']['gathered_length']}; a quarter of the tokens refined to single tokens).",
        "",
        "Mean ± standard error over the validation sequences; differences are paired.",
        "",
        "| attention | validation loss | minus 'projections' |",
        "|---|---|---|",
    ]
    names = {"dense": "dense", "projections": "Lighthouse scoring the projections (before the norm)",
             "normalized": "Lighthouse scoring the normalized q/k (trained gains)",
             "unit_gain": "Lighthouse scoring the normalized q/k with unit gains (a fresh QK-norm)",
             "constant": "Lighthouse, constant scores"}
    for v in VARIANTS:
        diff = r["loss_minus_projections"].get(v)
        lines.append(f"| {names[v]} | {_pm(r['loss'][v])} | {'' if diff is None else _pm(diff)} |")
    lines += [
        "",
        "Share of the gathered entries that a selection has in common with scoring the projections "
        "(per layer, KV head and sequence):",
        "",
        "| selection by | overlap |",
        "|---|---|",
    ]
    for k, v in r["selection_overlap_with_projections"].items():
        lines.append(f"| {names[k]} | {_pm(v, 3)} |")
    lines += [
        "",
        "Spread of the per-token scores ||q_t||, ||k_t||: coefficient of variation (std / mean over the tokens "
        "of a sequence), averaged over layers, heads, q and k:",
        "",
        "| model | before the norm | after it (its gains) | after it with unit gains |",
        "|---|---|---|---|",
    ]
    for label, s in (("trained", r["score_cv"]["trained"]), ("freshly initialized", r["score_cv"]["fresh"])):
        lines.append(f"| {label} | {_pm_sig(s['pre'])} | {_pm_sig(s['post'])} | {_pm_sig(s['post_unit_gain'])} |")
    lines += [
        "",
        "With unit gains ||x_hat|| = ||x|| / sqrt(||x||^2 / D + eps) still grows with ||x||: in float32 (here) it",
        "ranks tokens nearly as the projections do, however small its spread. Where q/k are rounded to bf16",
        "after the norm (GPU runs), rounding (relative 2^-9 per element) swamps that spread.",
        "",
    ]
    (out / "qk_norm_scores.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lh_qk_norm_scores"),
                        help="dataset and training run (reused when present and of the same config)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--val-samples", type=int, default=32)
    args = parser.parse_args(argv)
    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    folder, trained_here = prepare(args)
    cfg = checkpoint_config(folder, ["lighthouse.score_from=projections"])  # the wrappers below choose
    params = LighthouseParams.from_config(cfg.lighthouse, attention_backend=cfg.model.attention_backend)
    model = build_model(cfg)
    model.load_state_dict(load_model_state(folder))
    model.eval()
    loader = PackedLoader(cfg.data.path, "val", seq_len=cfg.data.seq_len, micro_batch=1, dp_rank=0, dp_degree=1,
                          seed=cfg.seed, max_batches=args.val_samples)
    samples = [batch for batch in loader]  # [1, N + 1] each
    result = evaluate(model, samples, params)
    result["score_cv"] = {"trained": result.pop("score_cv"), "fresh": fresh_spreads(cfg, samples)}
    m = cfg.model
    result = {
        "commit": _commit(), "torch": torch.__version__, "machine": f"{platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads", "seconds": time.time() - start, "trained_here": trained_here,
        "steps": cfg.schedule.steps,
        "tokens_per_step": cfg.data.seq_len * cfg.data.micro_batch, "seq_len": cfg.data.seq_len,
        "val_samples": len(samples),
        "model": {"dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
                  "head_dim": m.head_dim},
        "lighthouse": {"levels": params.levels, "pooling": params.pooling, "topk": params.topk,
                       "gathered_length": params.gathered_length(cfg.data.seq_len)},
        **result,
    }
    command = "python benchmarks/qk_norm_scores.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(args.out, result, command.strip())
    print((args.out / "qk_norm_scores.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
