r"""Steady-state training throughput of the paper's model on one GPU: lh-train's own step
(`lh_dist.train.step.TrainStep`: DeepSpeed, the run's loss, clipping and skip test), dense and
Lighthouse, per activation-checkpointing mode and with or without torch.compile, beside a plain
PyTorch reference step (SDPA, per-block checkpointing, fused AdamW, eager). B=1, random tokens.

    python benchmarks/train_throughput.py --out benchmarks/results
    python benchmarks/train_throughput.py --seq-lens 98304 --variants dense,lighthouse-2048 \
        --modes full,full+compile,selective+compile,none+compile
    python benchmarks/train_throughput.py --seq-lens 98304 --variants dense,lighthouse-2048 \
        --backends cudnn,flash_attn --modes selective+compile --name train_throughput_fa4

--modes lists `parallel.activation_checkpointing` values (none, full, selective), each optionally
with "+compile" (`parallel.compile=true`). --backends runs every lh_dist variant once per attention
kernel (model.attention_backend); the first backend and the first mode are the baseline of the
"vs" columns. The first step (compilation included) is reported apart from the steady steps.
Writes <name>.md (hardware, commit, command, table) and <name>.json.
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
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

from lh_dist.assembly.model import set_phase
from lh_dist.config import load_config
from lh_dist.model import Transformer
from lh_dist.ops.attention import BACKENDS, resolve_backend
from lh_dist.ops.attention.flash_attn4 import flash_attn_version
from lh_dist.parallel.distributed import close_distributed, init_distributed
from lh_dist.parallel.mesh import init_parallel_layout
from lh_dist.train.metrics import flops_per_step_token, peak_flops
from lh_dist.train.step import build_train_step

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "dense", "lighthouse-1536", "lighthouse-2048")


def _sdpa(q, k, v):
    # The reference path: PyTorch SDPA (cuDNN) on [B, H, N, D], nothing of lh_dist in between.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def plain_step_fn(cfg, device):
    """A plain PyTorch step: SDPA attention, per-block checkpointing, bf16 autocast, fused AdamW."""
    model = Transformer(cfg.model, [_sdpa] * cfg.model.n_layers).to(device)
    for layer in model.layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
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

    return step, model


def lh_dist_step_fn(cfg, device, phase):
    """lh-train's step, built by the Trainer's own `build_train_step` (one rank)."""
    train_step = build_train_step(cfg, init_parallel_layout(1, 1), device)
    set_phase(train_step.engine.module, phase)
    return (lambda tokens: train_step([tokens], cfg.optim.lr)), train_step.engine.module


def _mode(mode: str) -> tuple[str, bool]:
    ac, _, compiled = mode.partition("+")
    return ac, compiled == "compile"


def measure(variant: str, backend: str, mode: str, seq_len: int, args) -> dict:
    ac, compiled = _mode(mode)
    overrides = [f"data.seq_len={seq_len}", f"parallel.activation_checkpointing={ac}",
                 f"parallel.compile={str(compiled).lower()}", f"model.attention_backend={backend}",
                 f"schedule.lighthouse_steps={1 if variant.startswith('lighthouse') else 0}"]
    if variant.startswith("lighthouse"):
        overrides.append(f"lighthouse.topk={variant.split('-')[1]}")
    cfg = load_config(args.config, overrides)
    device = torch.device("cuda")
    torch.manual_seed(0)
    phase = "lighthouse" if variant.startswith("lighthouse") else "dense"
    torch._dynamo.reset()  # each variant compiles from scratch, so its first step shows the cost
    counters.clear()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # What earlier rows left allocated (DeepSpeed keeps references to its engines) is not this row's.
    left_over = torch.cuda.memory_allocated()
    if variant == "plain":
        step, model = plain_step_fn(cfg, device)
    else:
        step, model = lh_dist_step_fn(cfg, device, phase)
    n_matmul = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq_len + 1), device=device)
    times = []
    for _ in range(1 + args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[1 + args.warmup:]
    median = statistics.median(steady)
    flops = flops_per_step_token(cfg, n_matmul, phase) * seq_len / median
    peak = peak_flops(device)
    row = {"variant": variant, "backend": "sdpa" if variant == "plain" else backend,
           "mode": "full" if variant == "plain" else mode, "seq_len": seq_len, "first_step_s": times[0],
           "step_s": median, "tokens_per_s": seq_len / median, "mfu": flops / peak if peak else None,
           "peak_mem_gib": (torch.cuda.max_memory_allocated() - left_over) / 2**30, "times": times,
           "graph_breaks": sum(counters["graph_break"].values())}
    print(json.dumps(row), flush=True)
    if args.profile:
        row["profile_ms"] = profile_step(step, tokens)
        print(json.dumps({"profile_ms": row["profile_ms"]}), flush=True)
    del step, model
    return row


# Kernel families of a step, matched on CUDA kernel names in this order (lower case).
KERNEL_FAMILIES = (
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attn")),
    ("Lighthouse Triton kernels", ("_scores_kernel", "_select_kernel", "_segment_kernel", "_level_gather_kernel",
                                   "_refine")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "norm_kernel")),
    ("communication", ("nccl",)),
    ("compiled elementwise (Inductor)", ("triton_",)),
    ("other elementwise, copy and reduce", ("",)),
)


def profile_step(step, tokens) -> dict:
    """CUDA time (ms) of one more step by kernel family, and kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(tokens)
        torch.cuda.synchronize()
    totals = {name: 0.0 for name, _ in KERNEL_FAMILIES} | {"launches": 0}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.key.lower()
        family = next(f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys))
        totals[family] += event.device_time_total / 1e3
        totals["launches"] += event.count
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/paper-530m-98k.yaml")
    parser.add_argument("--seq-lens", default="98304,196608")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default="full,full+compile,selective+compile,none+compile",
                        help="comma-separated activation checkpointing modes (none, full, selective), each "
                             "optionally +compile; the first is the baseline of the 'vs' columns")
    parser.add_argument("--warmup", type=int, default=1, help="steps after the first, not timed")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--backends", default="auto",
                        help="comma-separated lh_dist attention backends (model.attention_backend) for the lh_dist "
                             "variants, each run in turn; the first is the baseline")
    parser.add_argument("--profile", action="store_true",
                        help="after each row's timing, profile one more step: CUDA time by kernel family")
    parser.add_argument("--name", default="train_throughput", help="output file stem")
    parser.add_argument("--commit", default=None, help="commit to report when the tree has no .git")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()
    backends, modes = args.backends.split(","), args.modes.split(",")
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        parser.error(f"--backends: {', '.join(unknown)} not among {', '.join(BACKENDS)}")
    bad = [m for m in modes if _mode(m)[0] not in ("none", "full", "selective") or m.count("+") > 1
           or ("+" in m and not m.endswith("+compile"))]
    if bad:
        parser.error(f"--modes: {', '.join(bad)}: each is none, full or selective, optionally +compile")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    head_dim = load_config(args.config, []).model.head_dim
    for name in backends:
        resolve_backend(name, torch.device("cuda"), torch.bfloat16, head_dim)  # fails now, saying why
    init_distributed(torch.device("cuda"))
    rows = []
    for n in args.seq_lens.split(","):
        for v in args.variants.split(","):
            for b in (backends[:1] if v == "plain" else backends):
                for m in (modes[:1] if v == "plain" else modes):
                    rows.append(measure(v, b, m, int(n), args))
    close_distributed(clean=True)

    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip() or "unknown"
    by = {(r["variant"], r["backend"], r["mode"], r["seq_len"]): r for r in rows}
    base_b, base_m = backends[0], modes[0]
    lines = [
        "# Training throughput, one GPU",
        "",
        f"- hardware: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- commit: {commit}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model: {args.config}, B=1, bf16; lh_dist rows time lh-train's step (`TrainStep`: DeepSpeed, "
        f"ZeRO stage {load_config(args.config, []).parallel.zero_stage}, clipping, skip test); plain: PyTorch SDPA, "
        f"per-block checkpointing, fused AdamW, eager; median of {args.steps} steps after the first step "
        f"and {args.warmup} more",
        f"- attention: lh_dist backends {', '.join(backends)} (resolved: "
        f"{', '.join(resolve_backend(b, torch.device('cuda'), torch.bfloat16, head_dim) for b in backends)}"
        f"{'; ' + flash_attn_version() if 'flash_attn' in backends else ''})",
        "",
        f"| context | variant | attention | checkpointing | first step (s) | step (s) | tokens/s "
        f"| vs dense, same mode | vs {base_m} {base_b} | MFU | peak memory (GiB) | graph breaks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense = by.get(("dense", r["backend"], r["mode"], r["seq_len"]))
        base = by.get((r["variant"], base_b, base_m, r["seq_len"]))
        ratio = f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x" if dense else "-"
        vs_base = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and r["variant"] != "plain" else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {r['seq_len']:,} | {r['variant']} | {r['backend']} | {r['mode']} | {r['first_step_s']:.2f} "
                     f"| {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {ratio} | {vs_base} | {mfu} "
                     f"| {r['peak_mem_gib']:.1f} | {r['graph_breaks']} |")
    profiled = [r for r in rows if "profile_ms" in r]
    if profiled:
        lines += ["", "CUDA time of one profiled step by kernel family (ms):", "",
                  "| variant | attention | checkpointing | " + " | ".join(f for f, _ in KERNEL_FAMILIES)
                  + " | kernel launches |",
                  "|---" * (4 + len(KERNEL_FAMILIES)) + "|"]
        for r in profiled:
            p = r["profile_ms"]
            lines.append(f"| {r['variant']} | {r['backend']} | {r['mode']} | "
                         + " | ".join(f"{p[f]:.0f}" for f, _ in KERNEL_FAMILIES) + f" | {p['launches']:,} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
