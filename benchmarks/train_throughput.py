"""Steady-state training throughput of the paper's model on one GPU: dense vs Lighthouse, and a plain
PyTorch reference step, everything else equal (bf16 autocast, activation checkpointing per layer,
AdamW, B=1, random tokens).

    python benchmarks/train_throughput.py --out benchmarks/results
    python benchmarks/train_throughput.py --seq-lens 98304 --steps 3 --variants dense,lighthouse-1536
    python benchmarks/train_throughput.py --seq-lens 98304 --variants dense,lighthouse-2048 \
        --backends cudnn,flash_attn --engine torch --name train_throughput_fa4

--backends runs every lh_dist variant once per attention kernel (model.attention_backend), side
by side in one run; the first is the baseline of the "vs" columns. --engine torch steps lh_dist's
model with PyTorch's fused AdamW instead of DeepSpeed (for machines without DeepSpeed; the
"plain" variant always does). Writes <name>.md (hardware, commit, command, table) and <name>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lh_dist.config import load_config
from lh_dist.ops.attention import BACKENDS, _flash_attn_version, resolve_backend
from lh_dist.model import Transformer
from lh_dist.runtime.build import build_model, flops_per_step_token, set_phase
from lh_dist.runtime.distributed import init_distributed
from lh_dist.train import engine as ds
from lh_dist.train.metrics import peak_flops

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "dense", "lighthouse-1536", "lighthouse-2048")


def _sdpa(q, k, v):
    # The reference path: PyTorch SDPA (cuDNN) on [B, H, N, D], nothing of lh_dist in between.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def _fused_adamw_step(cfg, model, device):
    """A plain PyTorch step of `model`: bf16 autocast, cross-entropy, clipping, fused AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            weight_decay=cfg.optim.weight_decay, fused=True)
    positions = torch.arange(cfg.data.seq_len, device=device)

    def step(tokens):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1], positions)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def plain_step_fn(cfg, device):
    model = Transformer(cfg.model, [_sdpa] * cfg.model.n_layers).to(device)
    for layer in model.layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
        if cfg.parallel.compile:
            layer.compile()
    return _fused_adamw_step(cfg, model, device), model


def torch_step_fn(cfg, device, phase):
    """lh_dist's model (its attention, checkpointing and compile) stepped by fused AdamW, no DeepSpeed."""
    model = build_model(cfg).to(device)
    set_phase(model, phase)
    return _fused_adamw_step(cfg, model, device), model


def lh_dist_step_fn(cfg, device, phase):
    model = build_model(cfg).to(device)
    set_phase(model, phase)
    engine = ds.build_engine(cfg, model, 1, device)
    positions = torch.arange(cfg.data.seq_len, device=device)

    def step(tokens):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = engine(tokens[:, :-1], positions)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        return loss

    return step, engine


def measure(variant: str, backend: str, seq_len: int, args) -> dict:
    overrides = [f"data.seq_len={seq_len}", "parallel.activation_checkpointing=true", "parallel.zero_stage=0",
                 f"parallel.compile={str(args.compile).lower()}", f"model.attention_backend={backend}",
                 f"schedule.lighthouse_steps={1 if variant.startswith('lighthouse') else 0}"]
    if variant.startswith("lighthouse"):
        overrides.append(f"lighthouse.topk={variant.split('-')[1]}")
    cfg = load_config(args.config, overrides)
    device = torch.device("cuda")
    torch.manual_seed(0)
    phase = "lighthouse" if variant.startswith("lighthouse") else "dense"
    if variant == "plain":
        step, holder = plain_step_fn(cfg, device)
    elif args.engine == "torch":
        step, holder = torch_step_fn(cfg, device, phase)
    else:
        step, holder = lh_dist_step_fn(cfg, device, phase)
    module = getattr(holder, "module", holder)  # a DeepSpeed engine wraps the model
    n_matmul = sum(p.numel() for p in module.parameters()) - module.embed.weight.numel()
    del module
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq_len + 1), device=device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step(tokens)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss), f"{variant} at {seq_len}: non-finite loss"
    median = statistics.median(times)
    flops = flops_per_step_token(cfg, n_matmul, phase) * seq_len / median
    peak = peak_flops(device)
    row = {"variant": variant, "backend": "sdpa" if variant == "plain" else backend, "seq_len": seq_len,
           "step_s": median, "tokens_per_s": seq_len / median,
           "mfu": flops / peak if peak else None, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "times": times}
    print(json.dumps(row), flush=True)
    del step, holder
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/paper-530m-98k.yaml")
    parser.add_argument("--seq-lens", default="98304,196608")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backends", default="auto",
                        help="comma-separated lh_dist attention backends (model.attention_backend) for the lh_dist "
                             "variants, each run in turn; the first is the baseline")
    parser.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed",
                        help="what steps the lh_dist variants: DeepSpeed (as lh-train) or PyTorch's fused AdamW")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block (all variants)")
    parser.add_argument("--name", default=None,
                        help="output file stem (default train_throughput, or train_throughput_compiled)")
    parser.add_argument("--commit", default=None, help="commit to report when the tree has no .git")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()
    backends = args.backends.split(",")
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        parser.error(f"--backends: {', '.join(unknown)} not among {', '.join(BACKENDS)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    head_dim = load_config(args.config, []).model.head_dim
    for name in backends:
        resolve_backend(name, torch.device("cuda"), torch.bfloat16, head_dim)  # fails now, saying why
    if args.engine == "deepspeed":
        init_distributed(torch.device("cuda"))
    rows = [measure(v, b, int(n), args) for n in args.seq_lens.split(",") for v in args.variants.split(",")
            for b in (backends[:1] if v == "plain" else backends)]

    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip() or "unknown"
    by = {(r["variant"], r["backend"], r["seq_len"]): r for r in rows}
    lines = [
        f"# Training throughput, one GPU{' (torch.compile)' if args.compile else ''}",
        "",
        f"- hardware: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- commit: {commit}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model: {args.config} (bf16 autocast, activation checkpointing per layer, AdamW, B=1"
        f"{', torch.compile per block' if args.compile else ''}); lh_dist variants stepped by "
        f"{'DeepSpeed' if args.engine == 'deepspeed' else 'PyTorch fused AdamW (no DeepSpeed)'}; "
        f"median of {args.steps} steps after {args.warmup} warm-up",
        f"- attention: lh_dist backends {', '.join(backends)} (resolved: "
        f"{', '.join(resolve_backend(b, torch.device('cuda'), torch.bfloat16, head_dim) for b in backends)}"
        f"{'; ' + _flash_attn_version() if 'flash_attn' in backends else ''}); plain: PyTorch SDPA",
        "",
        f"| context | variant | attention | step (s) | tokens/s | vs dense {backends[0]} | vs {backends[0]} | MFU "
        "| peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense = by.get(("dense", backends[0], r["seq_len"]))
        same = by.get((r["variant"], backends[0], r["seq_len"]))
        ratio = f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x" if dense else "-"
        vs_base = f"{r['tokens_per_s'] / same['tokens_per_s']:.2f}x" if same and r["variant"] != "plain" else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {r['seq_len']:,} | {r['variant']} | {r['backend']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {ratio} | {vs_base} | {mfu} | {r['peak_mem_gib']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("train_throughput_compiled" if args.compile else "train_throughput")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
