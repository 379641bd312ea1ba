"""The cost curve of lh-train's step on one GPU against the context length N, and what context
parallelism would make of it on paper.

    python benchmarks/scaling.py                        # every cell of the grid, each in a fresh process
    python benchmarks/scaling.py --budget-s 540         # starts no cell that would end after 9 minutes; run
                                                        # it again to continue (measured cells are kept)
    python benchmarks/scaling.py --report-only          # tables, fits and plot again from the JSON
    python benchmarks/scaling.py --project lighthouse-1m:1048576=6.64   # CP projection of a one-GPU step
                                                        # (docs/scaling.md has the full command)
    python benchmarks/scaling.py --device cpu --tiny --in-process --set parallel.compile=false \\
        --seq-lens 1024,2048,4096 --offload-from 2048 --out /tmp/scaling   # a CPU check of the script

Each cell times lh-train's step (`TrainStep` over DeepSpeed, built by train_throughput.py's
`lh_dist_step_fn`) at one N for one series, B=1, random tokens, with the parallel settings of
--config (configs/paper-270m-1m.yaml: full activation checkpointing + compile). Series:
  dense                   dense attention in every layer (the dense phase);
  lighthouse-paper        L=3, p=4, k=2048, layers 0, 1, -2, -1 dense (configs/paper-530m-98k.yaml);
  lighthouse-1m           L=4, p=4, k=4096, no dense layer (the 1M flavor; needs N >= 262,144);
  lighthouse-1m+offload   the same with parallel.activation_offload=cpu, from --offload-from on.
A series stops once a step takes longer than --max-step-s, or would (predicted from its earlier
cells); a cell that runs out of GPU memory is recorded as OOM and the series stops there. Dense
step times beyond the measured ones come from a least-squares fit t = a N + b N^2, marked as
extrapolated. The report states where Lighthouse's step becomes faster than dense and the ratio
at 1M, and projects per-GPU throughput under context parallelism (`cp_step`, docs/scaling.md).
Writes <name>.json and <name>.md after every cell, and <name>.png at the end (--report-only
redraws it from the JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from train_throughput import lh_dist_step_fn  # the benchmark's step, as lh-train builds it

from lh_dist.assembly.model import dense_layer_ids, lighthouse_length
from lh_dist.config import ConfigError, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
SEQ_LENS = tuple(32768 << i for i in range(7))  # 32,768 .. 2,097,152
# (levels, pooling, topk, dense layers) of each Lighthouse flavor; --tiny swaps in ones that tile short sequences.
FLAVORS = {"paper": (3, 4, 2048, "[0,1,-2,-1]"), "1m": (4, 4, 4096, "[]")}
TINY_FLAVORS = {"paper": (2, 2, 128, "[0,-1]"), "1m": (3, 2, 128, "[]")}
TINY_MODEL = ["model.dim=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
              "model.vocab_size=64"]
SERIES = ("dense", "lighthouse-paper", "lighthouse-1m", "lighthouse-1m+offload")
MILLION = 1 << 20


def series_overrides(series: str, tiny: bool) -> list[str]:
    """Config overrides of a series (on top of --config and --set)."""
    if series == "dense":
        return ["schedule.lighthouse_steps=0"]
    flavor = series.removeprefix("lighthouse-").removesuffix("+offload")
    levels, pooling, topk, dense = (TINY_FLAVORS if tiny else FLAVORS)[flavor]
    over = ["schedule.lighthouse_steps=1", f"lighthouse.levels={levels}", f"lighthouse.pooling={pooling}",
            f"lighthouse.topk={topk}", f"lighthouse.dense_layers={dense}"]
    return over + (["parallel.activation_offload=cpu"] if series.endswith("+offload") else [])


def cell_config(args, series: str, n: int) -> TrainConfig:
    """The config of a cell. On a GPU, an offloading cell offloads as many blocks as 90% of the
    host's available memory can pin (`parallel.activation_offload_layers`), all of them if it can."""
    over = [*(TINY_MODEL if args.tiny else []), *args.set, f"data.seq_len={n}", *series_overrides(series, args.tiny)]
    cfg = load_config(args.config, over)
    if cfg.parallel.activation_offload != "none" and args.device == "cuda":
        fit = min(cfg.model.n_layers, int(0.9 * _available_host_bytes() // block_input_bytes(cfg)))
        if fit < cfg.model.n_layers:
            cfg = load_config(args.config, [*over, f"parallel.activation_offload_layers={max(fit, 1)}"])
    return cfg


# ------------------------------------------------------------------ one cell


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def block_input_bytes(cfg: TrainConfig) -> int:
    """One block's input [B, N, E] in bf16 (on GPUs): what offloading moves per block."""
    return cfg.data.micro_batch * cfg.data.seq_len * cfg.model.dim * 2



def _available_host_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def precheck(args, series: str, n: int) -> dict | None:
    """The row of a cell that cannot run (status invalid or host-oom), found without running it."""
    row = {"series": series, "n": n}
    try:
        cfg = cell_config(args, series, n)
    except ConfigError as e:
        return row | {"status": "invalid", "error": str(e)}
    if cfg.parallel.activation_offload != "none" and args.device == "cuda":
        need, available = block_input_bytes(cfg), _available_host_bytes()
        if need > 0.9 * available:
            return row | {"status": "host-oom", "error": f"offloading one block needs {need / GiB:.0f} GiB of "
                                                         f"pinned host memory, {available / GiB:.0f} GiB available"}
    return None


def measure_cell(args, series: str, n: int) -> dict:
    """Time one cell in this process; a row (status ok or oom)."""
    cfg = cell_config(args, series, n)
    row = {"series": series, "n": n}
    if cfg.schedule.lighthouse_steps:
        row["gathered_length"] = lighthouse_length(cfg)
    device = torch.device(args.device)
    phase = "lighthouse" if cfg.schedule.lighthouse_steps else "dense"
    torch._dynamo.reset()  # each cell compiles from scratch, so its first step shows the cost
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    left_over = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    torch.manual_seed(0)
    step = module = None
    times: list[float] = []
    try:
        step, module = lh_dist_step_fn(cfg, device, phase)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, n + 1), device=device)
        for i in range(1 + args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if i >= 1 and times[-1] > args.max_step_s:
                break  # one steady step past the limit is enough to know
    except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is reported as an error
        if not _is_oom(e):
            raise
        row |= {"status": "oom", "error": str(e).splitlines()[0][:200]}
    else:
        steady = times[1 + args.warmup:] or times[1:] or times
        row |= {"status": "ok", "first_step_s": times[0], "step_s": statistics.median(steady),
                "times": times, "tokens_per_s": n / statistics.median(steady)}
    if device.type == "cuda":
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - left_over) / GiB
    offload = getattr(module, "activation_offload", None)
    if offload is not None:
        row["host_offload_peak_gib"] = offload.peak_host_bytes / GiB
        row["offloaded_blocks"] = cfg.parallel.activation_offload_layers or cfg.model.n_layers
    del step, module
    gc.collect()
    return row


def run_cell(args, series: str, n: int, timeout: float | None) -> dict | None:
    """A row for the cell, measured here (--in-process) or in a fresh process; None when it was
    stopped because the wall-clock budget ran out (nothing learnt)."""
    t0 = time.monotonic()
    if args.in_process:
        return measure_cell(args, series, n) | {"wall_s": time.monotonic() - t0}
    cmd = [sys.executable, __file__, "--cell", f"{series}@{n}", *_child_args(args)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        if timeout is not None and timeout < args.cell_timeout_s:
            return None
        return {"series": series, "n": n, "status": "timeout", "error": f"killed after {timeout:.0f} s",
                "wall_s": time.monotonic() - t0}
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
        status = "oom" if "out of memory" in r.stderr.lower() or r.returncode == -9 else "error"
        return {"series": series, "n": n, "status": status, "error": f"exit {r.returncode}: {tail}",
                "wall_s": time.monotonic() - t0}
    return json.loads(lines[-1]) | {"wall_s": time.monotonic() - t0}


def _child_args(args) -> list[str]:
    out = ["--config", args.config, "--device", args.device, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--max-step-s", str(args.max_step_s)]
    return out + (["--tiny"] if args.tiny else []) + [a for s in args.set for a in ("--set", s)]


def child_main(args) -> int:
    """--cell SERIES@N: measure it in this process and print its row as one JSON line."""
    from lh_dist.parallel.distributed import close_distributed, init_distributed

    series, n = args.cell.split("@")
    init_distributed(torch.device(args.device))
    row = measure_cell(args, series, int(n))
    row["host_rss_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB
    print(json.dumps(row), flush=True)
    close_distributed(clean=True)
    return 0


# ------------------------------------------------------------------ fits and comparisons


def attention_pairs(cfg: TrainConfig) -> float:
    """The attention work of a step in units of one layer's: the mean over layers of the squared
    length each attends over (N for dense layers, the gathered S for Lighthouse ones). N^2 for dense."""
    n, lh = cfg.data.seq_len, cfg.schedule.lighthouse_steps > 0
    s = lighthouse_length(cfg) if lh else n
    dense = dense_layer_ids(cfg) if lh else set(range(cfg.model.n_layers))
    return sum(n * n if i in dense else s * s for i in range(cfg.model.n_layers)) / cfg.model.n_layers


def fit_step_time(ns, ts, pairs=None) -> dict:
    """Least-squares fit t(N) = a N + b P(N) of step times, P the attention work (`attention_pairs`;
    N^2 when not given, so dense's a N + b N^2), with a, b >= 0 and in relative error (every point
    counts alike whatever its size): {"a": s per token, "b": s per attended pair}."""
    ns, ts = np.asarray(ns, dtype=np.float64), np.asarray(ts, dtype=np.float64)
    pairs = ns * ns if pairs is None else np.asarray(pairs, dtype=np.float64)
    scale = np.array([ns.max(), pairs.max()])  # columns of order 1 keep the system well conditioned
    design = np.stack([ns, pairs], axis=1) / scale / ts[:, None]
    # Non-negative least squares over two terms: the best fit of both, or of one alone.
    best, best_err = np.zeros(2), math.inf
    for keep in ([0, 1], [0], [1]):
        coef, *_ = np.linalg.lstsq(design[:, keep], np.ones_like(ts), rcond=None)
        err = float(np.sum((design[:, keep] @ coef - 1) ** 2))
        if np.all(coef >= 0) and err < best_err - 1e-12:
            best, best_err = np.zeros(2), err
            best[keep] = coef
    a, b = best / scale
    return {"a": float(a), "b": float(b)}


def fitted(fit: dict, n: float, pairs: float | None = None) -> float:
    """The fit's step time at n tokens (pairs: the attention work there; n^2 when not given)."""
    return fit["a"] * n + fit["b"] * (n * n if pairs is None else pairs)


def crossover(ns, dense_s, other_s) -> dict:
    """Where `other` becomes faster than dense, from step times on a common grid of N (ascending):
    {"n": N* interpolated log-log between the grid points around the change, "bound": "between"},
    {"n": ns[0], "bound": "at or below"} if it is faster from the start, {"n": None, ...} if never."""
    logs = [math.log(o / d) for o, d in zip(other_s, dense_s)]  # < 0: other is faster
    if logs[0] < 0:
        return {"n": ns[0], "bound": "at or below"}
    for i in range(1, len(ns)):
        if logs[i] < 0:
            x0, x1 = math.log(ns[i - 1]), math.log(ns[i])
            x = x0 + (x1 - x0) * logs[i - 1] / (logs[i - 1] - logs[i])  # where the log ratio crosses 0
            return {"n": math.exp(x), "bound": "between"}
    return {"n": None, "bound": "never in the grid"}


def ok_rows(rows: list[dict], series: str) -> list[dict]:
    return sorted((r for r in rows if r["series"] == series and r["status"] == "ok"), key=lambda r: r["n"])


def _pairs(args, series: str, n: int) -> float | None:
    try:
        return attention_pairs(cell_config(args, series, n))
    except ConfigError:  # this N does not tile for the series' Lighthouse
        return None


def analyse(args, rows: list[dict]) -> dict:
    """Fits (a N + b P(N) per series), dense extrapolated over the grid, 1M and every N measured
    in any run (so that a run over part of the grid keeps the others' rows), the crossovers and
    the ratio at 1M, from the measured rows."""
    out = {"fits": {}, "extrapolated": [], "crossover": {}, "ratio_at_1m": {}}
    for series in sorted({r["series"] for r in rows}):
        points = [(r["n"], r["step_s"], _pairs(args, series, r["n"])) for r in ok_rows(rows, series)]
        points = [p for p in points if p[2] is not None]
        if len(points) >= 2:
            out["fits"][series] = fit_step_time(*zip(*points))
    dense = ok_rows(rows, "dense")
    measured = {r["n"]: r["step_s"] for r in dense}
    if "dense" in out["fits"]:
        for n in sorted(set(args.seq_lens) | {r["n"] for r in rows} | {MILLION}):
            if n > max(measured):
                t = fitted(out["fits"]["dense"], n)
                out["extrapolated"].append({"series": "dense", "n": n, "step_s": t, "tokens_per_s": n / t})
    dense_at = measured | {r["n"]: r["step_s"] for r in out["extrapolated"]}
    for series in sorted({r["series"] for r in rows} - {"dense"}):
        lh = {r["n"]: r["step_s"] for r in ok_rows(rows, series)}
        common = sorted(set(lh) & set(dense_at))
        if common:
            out["crossover"][series] = crossover(common, [dense_at[n] for n in common], [lh[n] for n in common])
        if MILLION in lh and MILLION in dense_at:
            out["ratio_at_1m"][series] = {"dense_step_s": dense_at[MILLION], "step_s": lh[MILLION],
                                          "speedup": dense_at[MILLION] / lh[MILLION],
                                          "dense_extrapolated": MILLION not in measured}
    return out


# ------------------------------------------------------------------ context parallelism on paper


@dataclass(frozen=True)
class Interconnect:
    """What `cp_step` assumes of the GPUs and their links (docs/scaling.md says why)."""

    # NVLink 4 (H100/H200 SXM): 18 links of 25 GB/s per direction, 450 GB/s each way per GPU.
    link_bytes_per_s: float = 450e9
    # The share of it that NCCL's rings and point-to-point transfers reach on large messages.
    link_efficiency: float = 0.8
    # Attention throughput that hides a ring step's transfer (bf16 FlashAttention on an H200).
    attention_flops_per_s: float = 400e12

    @property
    def bytes_per_s(self) -> float:
        return self.link_bytes_per_s * self.link_efficiency


def kv_bytes(tokens: int, cfg: TrainConfig, element_size: int) -> int:
    """K and V of `tokens` positions: 2 x tokens x Hkv x D elements."""
    return 2 * tokens * cfg.model.n_kv_heads * cfg.model.head_dim * element_size


def ring_layer_s(length: int, cp: int, cfg: TrainConfig, net: Interconnect, forwards: int) -> tuple[int, float]:
    """(bytes sent per rank, exposed seconds) of one layer's ring attention over `length` positions
    cut into 2*cp zigzag chunks, with `forwards` forward passes (2 under full checkpointing).
    Each step's transfer hides behind that step's attention (half a block after the first)."""
    if cp == 1:
        return 0, 0.0
    local = length // cp
    block_flops = 4 * (local // 2) * local * cfg.model.n_heads * cfg.model.head_dim  # QK^T and PV, fwd
    kv, dkv = kv_bytes(local, cfg, 2), kv_bytes(local, cfg, 4)  # bf16 K/V, fp32 dK/dV accumulators
    fwd = (cp - 1) * max(0.0, kv / net.bytes_per_s - block_flops / net.attention_flops_per_s)
    # Backward: K/V and dK/dV travel together during a block's backward (2.5x its forward FLOPs);
    # the last hop of dK/dV back to their owner is not hidden.
    bwd = (cp - 1) * max(0.0, (kv + dkv) / net.bytes_per_s - 2.5 * block_flops / net.attention_flops_per_s)
    bwd += dkv / net.bytes_per_s
    return forwards * (cp - 1) * kv + (cp - 1) * kv + cp * dkv, forwards * fwd + bwd


def allgather_layer_s(gathered: int, cp: int, cfg: TrainConfig, net: Interconnect, forwards: int) -> tuple[int, float]:
    """(bytes sent per rank, exposed seconds) of one Lighthouse layer's all-gather exchange: the
    gathered K/V (bf16) all-gathered in every forward, fp32 dK/dV reduce-scattered in backward.
    Neither overlaps: the attention waits for the all-gather, the next layer's backward for dK/dV."""
    if cp == 1:
        return 0, 0.0
    local = gathered // cp
    sent = forwards * (cp - 1) * kv_bytes(local, cfg, 2) + (cp - 1) * kv_bytes(local, cfg, 4)
    return sent, sent / net.bytes_per_s


def num_params(cfg: TrainConfig) -> int:
    """Parameters of the decoder: embedding, output, and per layer attention, SwiGLU and two norms."""
    m = cfg.model
    kv = m.n_kv_heads * m.head_dim
    layer = 2 * m.dim * m.dim + 2 * m.dim * kv + 3 * m.dim * m.ffn_hidden + 2 * m.dim
    return m.n_layers * layer + m.dim + (1 if m.tie_embeddings else 2) * m.vocab_size * m.dim


def cp_step(step_s_1gpu: float, cfg: TrainConfig, cp: int, phase: str, exchange: str = "allgather",
            net: Interconnect = Interconnect(), fixed_s: float = 0.0) -> dict:
    """Expected step of one GPU of a CP group of `cp` for cfg's sequence (data.seq_len tokens, B=1),
    given the one-GPU step time at that length: the compute splits evenly over the group (zigzag
    sharding balances causal attention) except `fixed_s` per step; the exchanges add what they do
    not hide (`ring_layer_s`, `allgather_layer_s`), and the gradients' reduce-scatter and the
    parameters' all-gather (ZeRO) over the group are added in full.
    Returns compute_s, comm_bytes and comm_s (per rank), exposed_s, step_s and tokens_per_s_per_gpu."""
    n = cfg.data.seq_len
    forwards = 2 if cfg.parallel.activation_checkpointing == "full" else 1
    dense = dense_layer_ids(cfg) if phase == "lighthouse" else set(range(cfg.model.n_layers))
    sent, exposed = 0, 0.0
    for layer in range(cfg.model.n_layers):
        if layer in dense:
            b, s = ring_layer_s(n, cp, cfg, net, forwards)
        elif exchange == "ring":
            b, s = ring_layer_s(lighthouse_length(cfg), cp, cfg, net, forwards)
        else:
            b, s = allgather_layer_s(lighthouse_length(cfg), cp, cfg, net, forwards)
        sent, exposed = sent + b, exposed + s
    grads = 0 if cp == 1 else 2 * (cp - 1) * num_params(cfg) * 2 // cp  # bf16 reduce-scatter + all-gather
    sent, exposed = sent + grads, exposed + grads / net.bytes_per_s
    compute = fixed_s + (step_s_1gpu - fixed_s) / cp
    step = compute + exposed
    return {"compute_s": compute, "comm_bytes": sent, "comm_s": sent / net.bytes_per_s, "exposed_s": exposed,
            "step_s": step, "tokens_per_s_per_gpu": n / (cp * step)}


# What the projection covers: series, phase, Lighthouse exchanges; lengths and CP degrees.
PROJECTED = (("dense", "dense", ("ring",)), ("lighthouse-1m", "lighthouse", ("allgather", "ring")))
PROJECTED_LENGTHS, PROJECTED_DEGREES = (MILLION, 4 * MILLION, 8 * MILLION), (1, 2, 4, 8)


def one_gpu_steps(args, rows: list[dict], analysis: dict) -> dict:
    """{(series, N): (one-GPU step seconds, "measured" or "fit")} at the projected lengths."""
    out = {}
    for series, _, _ in PROJECTED:
        measured = {r["n"]: r["step_s"] for r in ok_rows(rows, series)}
        fit = analysis["fits"].get(series)
        for n in PROJECTED_LENGTHS:
            pairs = _pairs(args, series, n)
            if n in measured:
                out[series, n] = (measured[n], "measured")
            elif fit is not None and pairs is not None:
                out[series, n] = (fitted(fit, n, pairs), "fit")
    return out


def cp_projection(args, steps: dict, rows: list[dict] = ()) -> list[dict]:
    """`cp_step` for each one-GPU step of `steps` ({(series, N): (seconds, source)}) at every CP
    degree and Lighthouse exchange; with measured rows, also the memory per GPU: the one-GPU
    peak at N / CP from a linear fit of the series' measured peaks."""
    out = []
    for series, phase, exchanges in PROJECTED:
        mem = [(r["n"], r["peak_mem_gib"]) for r in ok_rows(list(rows), series) if r.get("peak_mem_gib")]
        mem_fit = np.polyfit([m[0] for m in mem], [m[1] for m in mem], 1) if len(mem) >= 2 else None
        for (name, n), (t1, source) in sorted(steps.items()):
            if name != series:
                continue
            cfg = cell_config(args, series, n)
            for exchange in exchanges:
                for cp in PROJECTED_DEGREES:
                    memory = float(np.polyval(mem_fit, n / cp)) if mem_fit is not None else None
                    out.append({"series": series, "exchange": exchange, "n": n, "cp": cp, "step_s_1gpu": t1,
                                "source": source, "memory_gib_per_gpu": memory} | cp_step(t1, cfg, cp, phase, exchange))
    return out


GPU_MEMORY_GIB = 139  # what an H200 lets a process allocate


def projection_table(projection: list[dict]) -> list[str]:
    """The markdown table of `cp_projection`'s rows (memory past an H200's marked)."""
    lines = ["| series | exchange | N | CP | 1-GPU step (s) | step (s) | exposed comm (s) | sent per GPU (GB) "
             "| tokens/s per GPU | memory per GPU (GiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in projection:
        lines.append(f"| {p['series']} | {p['exchange']} | {p['n']:,} | {p['cp']} | {p['step_s_1gpu']:.2f} "
                     f"({p['source']}) | {p['step_s']:.2f} | {p['exposed_s']:.3f} | {p['comm_bytes'] / 1e9:.2f} | "
                     f"{p['tokens_per_s_per_gpu']:,.0f} | {_fmt(p['memory_gib_per_gpu'], '.0f')}"
                     f"{' (over an H200)' if (p['memory_gib_per_gpu'] or 0) > GPU_MEMORY_GIB else ''} |")
    return lines


# ------------------------------------------------------------------ the grid


def predicted_step_s(points: list[dict], n: int) -> float | None:
    """A series' step time at n from its cells below n: the log-log slope of the last two
    (between 1 and 2), or quadratic growth from a single one."""
    below = [r for r in points if r["n"] < n]
    if not below:
        return None
    last = below[-1]
    slope = 2.0
    if len(below) >= 2:
        prev = below[-2]
        slope = min(2.0, max(1.0, math.log(last["step_s"] / prev["step_s"]) / math.log(last["n"] / prev["n"])))
    return last["step_s"] * (n / last["n"]) ** slope


def stop_reason(args, rows: list[dict], series: str, n: int) -> str | None:
    """Why a series measures nothing at n or beyond, from its cells so far; None to go on."""
    earlier = [r for r in rows if r["series"] == series and r["n"] < n]
    for r in earlier:
        if r["status"] in ("oom", "host-oom", "timeout", "error"):
            return f"{r['status']} at N={r['n']:,}"
        if r["status"] == "ok" and r["step_s"] > args.max_step_s:
            return f"a step took {r['step_s']:.0f} s at N={r['n']:,} (--max-step-s {args.max_step_s:g})"
    predicted = predicted_step_s(ok_rows(rows, series), n)
    if predicted is not None and predicted > args.max_step_s:
        return f"a step would take about {predicted:.0f} s (--max-step-s {args.max_step_s:g})"
    return None


def predicted_cell_s(args, rows: list[dict], series: str, n: int) -> float:
    """Wall-clock of a cell: the largest start-up and compile cost seen so far (--setup-s before
    any), plus its steps at the predicted step time."""
    setups = [r["wall_s"] - len(r["times"]) * r["step_s"] for r in rows if r["status"] == "ok" and "wall_s" in r]
    step = predicted_step_s(ok_rows(rows, series), n) or 0.0
    return max(setups, default=args.setup_s) + (1 + args.warmup + args.steps) * step


def measure_grid(args, data: dict, write) -> bool:
    """Measure every cell of the grid not in data["rows"] yet, writing after each one; False if
    the wall-clock budget stopped it first."""
    start, rows = time.monotonic(), data["rows"]
    for series in args.series:
        for n in args.seq_lens:
            if (series.endswith("+offload") and n < args.offload_from) or any(
                    r["series"] == series and r["n"] == n for r in rows):
                continue
            reason = stop_reason(args, rows, series, n)
            if reason is not None:
                print(f"scaling: {series} stops before N={n:,}: {reason}", flush=True)
                break
            row = precheck(args, series, n)
            if row is None:
                elapsed, timeout = time.monotonic() - start, args.cell_timeout_s
                if args.budget_s:
                    if elapsed + predicted_cell_s(args, rows, series, n) > args.budget_s:
                        print(f"scaling: --budget-s {args.budget_s:g} reached before {series} at N={n:,}",
                              flush=True)
                        return False
                    timeout = min(timeout, args.budget_s - elapsed)
                row = run_cell(args, series, n, timeout)
                if row is None:
                    print(f"scaling: --budget-s {args.budget_s:g} ran out during {series} at N={n:,}", flush=True)
                    return False
            rows.append(row | {"run": len(data["runs"]) - 1})
            print(json.dumps(rows[-1]), flush=True)
            write()
    return True


# ------------------------------------------------------------------ the report


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return os.environ.get("LH_DIST_COMMIT") or r.stdout.strip() or "unknown"


def _hardware(device: torch.device) -> str:
    host = f"{os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM"
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GiB:.0f} GiB), {host}, {versions}, CUDA {torch.version.cuda}"
    return f"CPU only: {host}, {versions}"


def _fmt(value, spec: str = ",.0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def report(args, data: dict) -> str:
    """The markdown report of data (rows measured so far, and what follows from them)."""
    rows, analysis = data["rows"], data["analysis"]
    lines = ["# lh-train's step against the context length, one GPU", ""]
    for i, run in enumerate(data["runs"]):
        lines.append(f"- run {i}: {run['started']}, commit {run['commit']}, {run['hardware']}; `{run['command']}`")
    lines += [f"- config: {args.config} with each series' overrides{' (--tiny)' if args.tiny else ''}"
              f"{', --set ' + ' '.join(args.set) if args.set else ''}; B=1, random tokens; lh-train's step "
              f"(`TrainStep`, DeepSpeed); step time = median of the steps after the first and {args.warmup} "
              f"more (the first, with compilation, is apart); peak GPU memory = torch.cuda.max_memory_allocated",
              "- series: dense; lighthouse-paper (L=3, p=4, k=2048, layers 0, 1, -2, -1 dense); lighthouse-1m (L=4, "
              "p=4, k=4096, no dense layer); lighthouse-1m+offload (parallel.activation_offload=cpu; host = pinned "
              "memory holding the block inputs, and the process's peak resident memory)", "",
              "| N | series | status | step (s) | tokens/s | peak GPU memory (GiB) | host: offloaded / process peak "
              "(GiB) | first step (s) | note |", "|---|---|---|---|---|---|---|---|---|"]
    table = [r for r in rows] + [r | {"status": "extrapolated"} for r in analysis["extrapolated"]]
    order = {s: i for i, s in enumerate(SERIES)}
    for r in sorted(table, key=lambda r: (r["n"], order.get(r["series"], 99))):
        host = (f"{_fmt(r.get('host_offload_peak_gib'), '.1f')} / {_fmt(r.get('host_rss_peak_gib'), '.1f')}"
                if "host_offload_peak_gib" in r else "")
        note = r.get("error", "")
        if r.get("offloaded_blocks"):
            note = f"{r['offloaded_blocks']} blocks offloaded" + (f"; {note}" if note else "")
        if r["status"] == "extrapolated":
            note = "a N + b N^2 fit of the measured dense steps"
        lines.append(f"| {r['n']:,} | {r['series']} | {r['status']} | {_fmt(r.get('step_s'), '.3f')} | "
                     f"{_fmt(r.get('tokens_per_s'))} | {_fmt(r.get('peak_mem_gib'), '.1f')} | {host} | "
                     f"{_fmt(r.get('first_step_s'), '.1f')} | {note} |")
    lines += ["", "## Fits and the crossover", "",
              "Step time t(N) = a N + b P(N), P the mean over layers of the squared length each attends over "
              "(N^2 for dense, so a N + b N^2; S^2 for Lighthouse layers); least squares in relative error.", ""]
    for series, fit in sorted(analysis["fits"].items()):
        lines.append(f"- {series}: a = {fit['a']:.4g} s/token, b = {fit['b']:.4g} s/pair")
    for series, cross in sorted(analysis["crossover"].items()):
        if cross["n"] is None:
            lines.append(f"- {series}: not faster than dense at any N of the grid")
        elif cross["bound"] == "at or below":
            lines.append(f"- {series}: faster than dense already at N = {cross['n']:,.0f}, the smallest N of both")
        else:
            lines.append(f"- {series}: faster than dense from N = {cross['n']:,.0f} on (log-log interpolation "
                         f"between the grid points around it)")
    for series, ratio in sorted(analysis["ratio_at_1m"].items()):
        extrapolated = " (extrapolated)" if ratio["dense_extrapolated"] else ""
        lines.append(f"- at N = 1,048,576, {series} takes {ratio['step_s']:.2f} s per step against "
                     f"{ratio['dense_step_s']:.1f} s for dense{extrapolated}: {ratio['speedup']:.1f}x faster")
    if data.get("cp_projection"):
        net = Interconnect()
        lines += ["", "## Context parallelism on paper", "",
                  f"Per-GPU throughput of a CP group, from the one-GPU step above (measured, or its fit) by "
                  f"`cp_step`: compute split evenly over the group, plus the exchanges' transfers that are not "
                  f"hidden, at {net.link_bytes_per_s / 1e9:.0f} GB/s per direction x {net.link_efficiency} "
                  f"(NVLink 4); ring steps hide behind attention at {net.attention_flops_per_s / 1e12:.0f} TFLOP/s; "
                  f"all-gathers and the ZeRO gradient exchange do not. Memory per GPU: the one-GPU peak at N / CP "
                  f"(a linear fit of the measured peaks). The assumptions are explained in docs/scaling.md.", "",
                  *projection_table(data["cp_projection"])]
    lines += ["", f"![tokens/s and memory against N]({args.name}.png)", ""]
    return "\n".join(lines)


def plot(args, data: dict, path: Path) -> None:
    """Log-log tokens/s and peak memory against N per series; extrapolated dense dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for series in SERIES:
        points = ok_rows(data["rows"], series)
        if not points:
            continue
        line, = speed.plot([r["n"] for r in points], [r["tokens_per_s"] for r in points], "o-", label=series)
        extra = [r for r in data["analysis"]["extrapolated"] if r["series"] == series]
        if extra:
            speed.plot([points[-1]["n"]] + [r["n"] for r in extra],
                       [points[-1]["tokens_per_s"]] + [r["tokens_per_s"] for r in extra], "--",
                       color=line.get_color(), label=f"{series} (extrapolated)")
        mem = [r for r in points if r.get("peak_mem_gib") is not None]
        if mem:
            memory.plot([r["n"] for r in mem], [r["peak_mem_gib"] for r in mem], "o-", color=line.get_color(),
                        label=f"{series}: GPU")
        host = [r for r in points if r.get("host_offload_peak_gib")]
        if host:
            memory.plot([r["n"] for r in host], [r["host_offload_peak_gib"] for r in host], "s:",
                        color=line.get_color(), label=f"{series}: host (offloaded)")
    for ax, label in ((speed, "tokens/s"), (memory, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length N (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    speed.set_title("lh-train step, one GPU")
    memory.set_title("memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(args, data: dict, with_plot: bool = True) -> None:
    """Analysis, JSON, markdown and (unless told not to) plot of what data holds now."""
    data["analysis"] = analyse(args, data["rows"])
    data["cp_projection"] = cp_projection(args, one_gpu_steps(args, data["rows"], data["analysis"]), data["rows"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{args.name}.md").write_text(report(args, data))
    if with_plot:
        plot(args, data, out / f"{args.name}.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked; --series and --seq-lens as lists."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/paper-270m-1m.yaml", help="model and parallel settings")
    parser.add_argument("--series", default=",".join(SERIES), help=f"comma-separated, of {', '.join(SERIES)}")
    parser.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)), help="comma-separated N, ascending")
    parser.add_argument("--offload-from", type=int, default=262144, help="smallest N of the +offload series")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per cell (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="steps after the first, not timed")
    parser.add_argument("--max-step-s", type=float, default=60.0,
                        help="a series stops once a step takes (or would take) longer")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no cell that would end after this many seconds of the run (0: no limit)")
    parser.add_argument("--cell-timeout-s", type=float, default=900.0, help="a cell still running is killed")
    parser.add_argument("--setup-s", type=float, default=90.0,
                        help="start-up and compile time of a cell assumed before any cell has run")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny model and Lighthouse flavors (checks on CPU)")
    parser.add_argument("--set", action="append", default=[], metavar="section.field=value",
                        help="config override for every cell (repeatable)")
    parser.add_argument("--in-process", action="store_true", help="measure every cell in this process")
    parser.add_argument("--fresh", action="store_true", help="forget the rows of an existing <name>.json")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from <name>.json")
    parser.add_argument("--project", action="append", default=[], metavar="SERIES:N=SECONDS[,N=SECONDS...]",
                        help="print the context-parallel projection of these one-GPU step times (series dense or "
                             "lighthouse-1m) and exit; repeatable")
    parser.add_argument("--memory", action="append", default=[], metavar="SERIES:N=GIB[,N=GIB...]",
                        help="with --project: one-GPU peak memory at these N, for the memory per GPU column")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # SERIES@N: measure one cell (the child process)
    parser.add_argument("--name", default="scaling", help="output file stem")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args(argv)
    args.series = args.series.split(",")
    unknown = [s for s in args.series if s not in SERIES]
    if unknown:
        parser.error(f"--series: {', '.join(unknown)} not among {', '.join(SERIES)}")
    args.seq_lens = sorted(int(n) for n in args.seq_lens.split(","))
    args.steps_given, args.memory_given = {}, []
    for flag, specs in (("--project", args.project), ("--memory", args.memory)):
        for spec in specs:
            series, _, points = spec.partition(":")
            if series not in [p[0] for p in PROJECTED] or not points:
                parser.error(f"{flag} {spec}: expected dense:N=VALUE or lighthouse-1m:N=VALUE[,N=VALUE...]")
            for point in points.split(","):
                n, _, value = point.partition("=")
                if flag == "--project":
                    args.steps_given[series, int(n)] = (float(value), "given")
                else:
                    args.memory_given.append({"series": series, "n": int(n), "status": "ok",
                                              "peak_mem_gib": float(value)})
    needs_gpu = not (args.cell or args.project or args.report_only)
    if needs_gpu and args.device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --device cpu)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cell:
        return child_main(args)
    if args.steps_given:
        print("\n".join(projection_table(cp_projection(args, args.steps_given, args.memory_given))))
        return 0
    device = torch.device(args.device)
    path = Path(args.out) / f"{args.name}.json"
    data = {"runs": [], "rows": []}
    if path.exists() and not args.fresh:
        data = json.loads(path.read_text())
    if not args.report_only:
        data["runs"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": _commit(),
                             "hardware": _hardware(device),
                             "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv)})
        if args.in_process:
            from lh_dist.parallel.distributed import close_distributed, init_distributed

            init_distributed(device)
        # After each cell the JSON and the tables (a killed run keeps them); the plot at the end.
        complete = measure_grid(args, data, lambda: write_results(args, data, with_plot=False))
        if args.in_process:
            close_distributed(clean=True)
    write_results(args, data)
    print(report(args, data))
    if not args.report_only:
        print("scaling: the grid is complete" if complete else
              "scaling: the grid is not complete; run the same command again to continue", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
