"""Single-GPU attention benchmark: dense attention vs Lighthouse (Triton path), per attention kernel.

Each backend of --backends (lh_dist.ops.attention: cudnn, flash_attn, flash, ...) runs both the
dense layer and Lighthouse's inner attention, side by side in one run. For each sequence length:
median forward and forward+backward latency (CUDA events, after warm-up) and peak memory of one
attention layer, the speedups between backends, and a breakdown of Lighthouse time into its
stages. Writes attention_<gpu><suffix>.md (tables, hardware, versions, commit, command) and
attention_<gpu><suffix>.png (log-log latency) to --out-dir.

    PYTHONPATH=. python benchmarks/attention.py                      # B=1 H=8 D=128 bf16, L=3 p=4 topk=2048
    PYTHONPATH=. python benchmarks/attention.py --backends cudnn flash_attn --suffix _fa4
    PYTHONPATH=. python benchmarks/attention.py --lengths 32768 --iters 3   # quick check
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from lh_dist.ops.attention import BACKENDS, attention, attention_backward, attention_forward, resolve_backend
from lh_dist.ops.lighthouse import LighthouseParams, lighthouse_attention
from lh_dist.ops.lighthouse import triton_kernels as kernels

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2**15, 2**16, 2**17, 2**18, 2**19])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--pooling", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--backends", nargs="+", default=["cudnn", "flash"], choices=BACKENDS,
                        help="lh_dist.ops.attention backends, each for dense and for Lighthouse's inner attention; "
                             "the first is the baseline of the speedup table")
    parser.add_argument("--max-dense-length", type=int, default=None,
                        help="skip dense attention above this N (it grows as N^2); Lighthouse runs at every N")
    parser.add_argument("--suffix", default="", help="appended to the output file names")
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions (fewer when one takes > 1 s)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--commit", default=None, help="commit to report when the tree has no .git")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args()


def median_ms(fn, iters: int, warmup: int) -> float:
    """Median of CUDA-event timings of fn() after warm-up; fewer repetitions for slow calls."""
    for i in range(warmup):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if start.elapsed_time(end) > 500:  # slow calls (dense at long N) are warm after one run
            break
    times = []
    budget_ms = 4000.0
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if sum(times) > budget_ms and len(times) >= 3:
            break
    return statistics.median(times)


def peak_gib(fn) -> float:
    """Peak memory allocated during fn() above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / GiB


def fwd_bwd(layer, q, k, v, grad):
    def run():
        out = layer(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    return run


def lighthouse_params(args, attention_backend: str = "auto") -> LighthouseParams:
    return LighthouseParams(levels=args.levels, pooling=args.pooling, topk=args.topk, backend="triton",
                            attention_backend=attention_backend)


def lighthouse_breakdown(q, k, v, grad, args, backend, iters, warmup):
    """Milliseconds per stage, each timed alone on the same inputs; inner attention by `backend`."""
    levels, pooling, n_tiles, n = args.levels, args.pooling, lighthouse_params(args).n_tiles, q.shape[1]
    q_scores, k_scores = kernels.pyramid_scores_triton(q, k, levels, pooling)
    index, inverse = kernels.select_triton(q_scores, k_scores, n, levels, pooling, n_tiles)
    gathered = [kernels.segment(x, index, n, levels, pooling, shift=False, mean=True) for x in (q, k, v)]
    og, lse = attention_forward(*gathered, causal=True, backend=backend)
    dog = kernels.segment(grad, index, n, levels, pooling, shift=True, mean=False)
    dgathered = attention_backward(dog, *gathered, og, lse, causal=True, backend=backend)
    stages = {
        "fwd: pool+score": lambda: kernels.pyramid_scores_triton(q, k, levels, pooling),
        "fwd: select": lambda: kernels.select_triton(q_scores, k_scores, n, levels, pooling, n_tiles),
        "fwd: gather (q, k, v)": lambda: [kernels.segment(x, index, n, levels, pooling, shift=False, mean=True)
                                          for x in (q, k, v)],
        "fwd: attention": lambda: attention_forward(*gathered, causal=True, backend=backend),
        "fwd: scatter": lambda: kernels.level_gather(og, inverse, n, levels, pooling, scatter=True),
        "bwd: scatter": lambda: kernels.segment(grad, index, n, levels, pooling, shift=True, mean=False),
        "bwd: attention": lambda: attention_backward(dog, *gathered, og, lse, causal=True, backend=backend),
        "bwd: gather (q, k, v)": lambda: [kernels.level_gather(dx.contiguous(), inverse, n, levels, pooling,
                                                               scatter=False) for dx in dgathered],
    }
    return {name: median_ms(fn, iters, warmup) for name, fn in stages.items()}


def commit(args) -> str:
    if args.commit:
        return args.commit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU", file=sys.stderr)
        return 1
    for n in args.lengths:
        lighthouse_params(args).check(n)
    device = torch.device("cuda")
    for name in args.backends:  # fail now, saying why, rather than after the first lengths
        resolve_backend(name, device, torch.bfloat16, args.head_dim)
    gpu = torch.cuda.get_device_name()
    b, h, hkv, d = 1, args.heads, args.kv_heads, args.head_dim

    def dense(name):
        return lambda q, k, v: attention(q, k, v, causal=True, backend=name)

    def lighthouse(name):
        return lambda q, k, v: lighthouse_attention(q, k, v, lighthouse_params(args, name))

    methods = {f"{kind} {name}": make(name) for kind, make in (("dense", dense), ("lighthouse", lighthouse))
               for name in args.backends}
    rows, breakdowns = [], {}
    for n in args.lengths:
        gen = torch.Generator(device=device).manual_seed(n)
        q, k, v = (torch.randn(b, n, heads, d, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
                   for heads in (h, hkv, hkv))
        grad = torch.randn(b, n, h, d, device=device, dtype=torch.bfloat16, generator=gen)
        for name, layer in methods.items():
            if name.startswith("dense") and args.max_dense_length is not None and n > args.max_dense_length:
                continue
            with torch.no_grad():
                fwd = median_ms(lambda: layer(q, k, v), args.iters, args.warmup)
            both = median_ms(fwd_bwd(layer, q, k, v, grad), args.iters, args.warmup)
            mem = peak_gib(fwd_bwd(layer, q, k, v, grad))
            rows.append((n, name, fwd, both, mem))
            print(f"N={n:>7} {name:<22} fwd {fwd:9.3f} ms  fwd+bwd {both:9.3f} ms  peak {mem:6.2f} GiB", flush=True)
        for name in args.backends:
            parts = lighthouse_breakdown(q.detach(), k.detach(), v.detach(), grad, args, name, args.iters,
                                         args.warmup)
            breakdowns[(n, name)] = parts
            print(f"N={n:>7} breakdown ({name}) " + ", ".join(f"{s} {t:.3f}" for s, t in parts.items()), flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()
    write_report(args, rows, breakdowns, gpu)
    return 0


def versions(backends) -> str:
    line = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"triton {__import__('triton').__version__}")
    if "flash_attn" in backends:
        from lh_dist.ops.attention.flash_attn4 import flash_attn_version

        line += f", {flash_attn_version()}"
    return line


def write_report(args, rows, breakdowns, gpu: str) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = gpu.replace("NVIDIA ", "").split()[0].lower() + args.suffix
    names = list(dict.fromkeys(name for _, name, *_ in rows))
    table = {(n, name): (f, fb, m) for n, name, f, fb, m in rows}
    base = args.backends[0]
    command = "PYTHONPATH=. python benchmarks/attention.py " + " ".join(sys.argv[1:])

    def ratio(n, slow, fast):
        if (n, slow) not in table or (n, fast) not in table:
            return "-"
        return f"{table[(n, slow)][0] / table[(n, fast)][0]:.2f}x / {table[(n, slow)][1] / table[(n, fast)][1]:.2f}x"

    lines = [
        f"# Attention latency: dense vs Lighthouse, by attention kernel ({gpu})",
        "",
        f"- hardware: {gpu}, {torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB; host {platform.node()}",
        f"- {versions(args.backends)}",
        f"- commit: {commit(args)} (plus the working tree at the time of the run)",
        f"- command: `{command}`",
        f"- shapes: B=1, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, bf16, causal; Lighthouse L={args.levels}, "
        f"p={args.pooling}, topk={args.topk}, norm scorer, Triton path; attention kernels (lh_dist backends): "
        f"{', '.join(args.backends)}, each for the dense layer and for Lighthouse's inner attention",
        "- latency: median of CUDA-event timings after warm-up (ms); memory: peak allocated during one fwd+bwd "
        "above the inputs (GiB); speedups are time ratios fwd / fwd+bwd (above 1: the second one is faster)",
        "",
        "| N | S (Lighthouse) | " + " | ".join(f"{m} fwd | {m} fwd+bwd | {m} mem" for m in names) + " |",
        "|" + "---|" * (2 + 3 * len(names)),
    ]
    for n in args.lengths:
        s = lighthouse_params(args).gathered_length(n)
        cells = [f"{n:,}", f"{s:,}"]
        for m in names:
            if (n, m) in table:
                f, fb, mem = table[(n, m)]
                cells += [f"{f:.3f}", f"{fb:.3f}", f"{mem:.2f}"]
            else:
                cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = [(f"dense {name}", f"lighthouse {name}") for name in args.backends]
    pairs += [(f"{kind} {base}", f"{kind} {name}") for kind in ("dense", "lighthouse") for name in args.backends[1:]]
    lines += ["", "## Speedups", "", "| N | " + " | ".join(f"{fast} vs {slow}" for slow, fast in pairs) + " |",
              "|" + "---|" * (1 + len(pairs))]
    for n in args.lengths:
        lines.append(f"| {n:,} | " + " | ".join(ratio(n, slow, fast) for slow, fast in pairs) + " |")
    stages = list(next(iter(breakdowns.values())))
    lines += ["", "## Lighthouse breakdown (ms, each stage timed alone)", "",
              "| N | inner attention | " + " | ".join(stages) + " | sum fwd | sum bwd |",
              "|" + "---|" * (len(stages) + 4)]
    for (n, name), parts in breakdowns.items():
        fwd = sum(t for s, t in parts.items() if s.startswith("fwd"))
        bwd = sum(t for s, t in parts.items() if s.startswith("bwd"))
        lines.append(f"| {n:,} | {name} | " + " | ".join(f"{parts[s]:.3f}" for s in stages)
                     + f" | {fwd:.3f} | {bwd:.3f} |")
    md = args.out_dir / f"attention_{slug}.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, col, title in ((axes[0], 0, "forward"), (axes[1], 1, "forward + backward")):
        for m in names:
            lengths = [n for n in args.lengths if (n, m) in table]
            ax.loglog(lengths, [table[(n, m)][col] for n in lengths], "o-", label=m, base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{title}, {gpu}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"B=1 H={args.heads} D={args.head_dim} bf16; Lighthouse L={args.levels} p={args.pooling} topk={args.topk}")
    fig.tight_layout()
    fig.savefig(args.out_dir / f"attention_{slug}.png", dpi=120)
    print(f"wrote {md} and {md.with_suffix('.png')}")


if __name__ == "__main__":
    raise SystemExit(main())
