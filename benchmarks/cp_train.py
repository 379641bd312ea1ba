r"""Training throughput per GPU under context parallelism against one GPU: lh-train's own step
(`TrainStep` over `Engine` over `build_model` with the CP group, from `build_train_step` as in the Trainer), per
sequence length, phase (Lighthouse, dense) and Lighthouse exchange (allgather, ring). Random tokens.

    torchrun --standalone --nproc-per-node 2 benchmarks/cp_train.py --baseline benchmarks/results/cp_train_1gpu.json
    torchrun --standalone --nproc-per-node 4 benchmarks/cp_train.py --dp 2 --baseline benchmarks/results/cp_train_1gpu.json
    python benchmarks/cp_train.py --name cp_train_1gpu                   # the 1-GPU rows alone
    torchrun --standalone --nproc-per-node 2 benchmarks/cp_train.py --device cpu --config configs/tiny-cpu.yaml \
        --seq-lens 1024 --modes none --backends math --steps 2 --out /tmp/cp_train   # gloo, checks the script

Under torchrun on W ranks the layout is DP --dp x CP W / --dp (CP innermost, as lh-train lays it out);
a plain `python` is one rank. --baseline FILE: the 1-GPU rows of a run of this script on one GPU
(the JSON it wrote); when FILE does not exist, rank 0 first runs that 1-GPU invocation on its own
GPU into FILE while the other ranks wait. The rows then carry the ratio per-GPU CP throughput /
1-GPU throughput, against the targets at 196,608 tokens (Lighthouse >= 0.90, dense >= 0.95).

--modes lists `parallel.activation_checkpointing` values (none, full, selective), each optionally
with "+compile"; --backends lists model.attention_backend values. Each row times --steps steps after
the first step (compilation included, reported apart) and --warmup more; the step time is the
slowest rank's median. Peak memory is the largest rank's, net of what earlier rows left allocated.
On one rank, a row that runs out of GPU memory is reported as such and the next row follows
(under CP the other ranks would wait for it in a collective, so it stops the run).
Rank 0 writes <name>.md (hardware, GPU count, commit, command, table) and <name>.json after every row.
Extra `section.field=value` arguments override the config of every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lh_dist.assembly.model import set_phase
from lh_dist.config import load_config
from lh_dist.ops.attention import BACKENDS
from lh_dist.parallel.comm import EXCHANGES
from lh_dist.parallel.device import local_device
from lh_dist.parallel.distributed import close_distributed, init_distributed
from lh_dist.parallel.mesh import init_parallel_layout, resolve_degrees
from lh_dist.train.step import build_train_step

REPO = Path(__file__).resolve().parents[1]
PHASES = ("lighthouse", "dense")
# The targets at 196,608 tokens: per-GPU CP throughput over 1-GPU throughput.
TARGETS = {"lighthouse": 0.90, "dense": 0.95}
TARGET_SEQ_LEN = 196608
# NVLink multicast off and one hardware queue per GPU, as slurm/train.sbatch sets them for CP on Hopper.
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
# What torchrun tells its workers; a child started without them is a world of one (with
# TORCHELASTIC_USE_AGENT_STORE left set it would wait for torchrun's store on a port nobody serves).
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def _mode(mode: str) -> tuple[str, bool]:
    ac, _, compiled = mode.partition("+")
    return ac, compiled == "compile"


def row_config(args, seq_len: int, phase: str, exchange: str, mode: str, backend: str, cp: int):
    ac, compiled = _mode(mode)
    overrides = [f"data.seq_len={seq_len}", f"parallel.activation_checkpointing={ac}",
                 f"parallel.compile={str(compiled).lower()}", f"model.attention_backend={backend}",
                 f"parallel.cp_degree={cp}", f"parallel.dp_degree=0", f"device={args.device}",
                 f"schedule.lighthouse_steps={1 if phase == 'lighthouse' else 0}", "schedule.warmup_steps=0",
                 *([f"parallel.lighthouse_exchange={exchange}"] if exchange != "-" else []), *args.overrides]
    return load_config(args.config, overrides)


def measure(args, layout, device, seq_len: int, phase: str, exchange: str, mode: str, backend: str) -> dict:
    """Time lh-train's step for one row on every rank; the slowest rank's median, the largest peak memory."""
    world, cp = layout.world_size, layout.cp_degree
    cfg = row_config(args, seq_len, phase, exchange, mode, backend, cp)
    torch._dynamo.reset()  # each row compiles from scratch, so its first step shows the cost
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    left_over = torch.cuda.memory_allocated(device) if cuda else 0  # earlier rows' engines are not this row's
    step = build_train_step(cfg, layout, device)  # lh-train's step, as its Trainer builds it
    set_phase(step.engine.module, phase)
    # The ranks of a CP group share their samples (same dp_rank), as the loader hands them out.
    gen = torch.Generator().manual_seed(1000 + layout.dp_rank)
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch, seq_len + 1), generator=gen)
    times = []
    for _ in range(1 + args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step([batch] * cfg.optim.grad_accum, cfg.optim.lr)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - left_over) / 2**30 if cuda else float("nan")
    stats = torch.tensor([times[0], statistics.median(times[1 + args.warmup:]), peak], dtype=torch.float64)
    if world > 1:
        stats = stats.to(device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    first, median, peak = stats.tolist()
    tokens = seq_len * cfg.data.micro_batch * cfg.optim.grad_accum * layout.dp_degree
    row = {"seq_len": seq_len, "phase": phase, "exchange": exchange, "mode": mode, "backend": backend,
           "gpus": world, "dp": layout.dp_degree, "cp": cp, "first_step_s": first, "step_s": median,
           "tokens_per_s_per_gpu": tokens / median / world, "peak_mem_gib": None if peak != peak else peak,
           "times": times}
    del step
    return row


def _key(row: dict) -> tuple:
    return row["seq_len"], row["phase"], row["mode"], row["backend"]


def add_ratios(rows: list[dict], baseline: list[dict]) -> None:
    base = {_key(r): r for r in baseline}
    for r in rows:
        b = base.get(_key(r))
        ok = b is not None and "error" not in b and "error" not in r
        r["ratio_vs_1gpu"] = r["tokens_per_s_per_gpu"] / b["tokens_per_s_per_gpu"] if ok else None
        r["target"] = TARGETS[r["phase"]] if r["seq_len"] == TARGET_SEQ_LEN and r["cp"] > 1 else None


def _shown(path: str) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _commit() -> str:
    if os.environ.get("LH_DIST_COMMIT"):
        return os.environ["LH_DIST_COMMIT"]
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def _hardware(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        return (f"{world}x {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"Python {platform.python_version()}")
    return f"{world} CPU rank(s) on {os.cpu_count()} cores ({platform.machine()}), gloo, torch {torch.__version__}"


def write(args, meta: dict, rows: list[dict]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))
    lines = [
        "# Training throughput per GPU under context parallelism",
        "",
        f"- hardware: {meta['hardware']}; {meta['gpus']} rank(s): dp {meta['dp']} x cp {meta['cp']}",
        f"- commit: {meta['commit']}",
        f"- command: `{meta['command']}`",
        f"- config: {meta['config']}{' with ' + ' '.join(meta['overrides']) if meta['overrides'] else ''}; "
        f"micro_batch {meta['micro_batch']}, "
        f"lh-train's step (`TrainStep` over DeepSpeed, ZeRO stage {meta['zero_stage']}); the slowest rank's median of "
        f"{args.steps} steps after the first and {args.warmup} more",
        f"- 1-GPU baseline: {meta['baseline'] or 'none'}; ratio = per-GPU tokens/s here / 1-GPU tokens/s (targets at "
        f"{TARGET_SEQ_LEN:,} tokens: Lighthouse >= {TARGETS['lighthouse']}, dense >= {TARGETS['dense']})",
        "",
        "| context | phase | exchange | checkpointing | attention | GPUs | first step (s) | step (s) "
        "| tokens/s per GPU | vs 1 GPU | target | peak memory per GPU (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq_len']:,} | {r['phase']} | {r['exchange']} | {r['mode']} | {r['backend']} "
                         f"| {r['gpus']} (dp {r['dp']} x cp {r['cp']}) | {r['error']} |||||| ")
            continue
        ratio = r.get("ratio_vs_1gpu")
        target = r.get("target")
        met = "-" if target is None or ratio is None else f">= {target:.2f}: {'met' if ratio >= target else 'missed'}"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(f"| {r['seq_len']:,} | {r['phase']} | {r['exchange']} | {r['mode']} | {r['backend']} "
                     f"| {r['gpus']} (dp {r['dp']} x cp {r['cp']}) | {r['first_step_s']:.2f} | {r['step_s']:.3f} "
                     f"| {r['tokens_per_s_per_gpu']:,.0f} | {'-' if ratio is None else f'{ratio:.3f}'} | {met} "
                     f"| {mem} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def baseline_command(args, path: Path) -> list[str]:
    """This script on one rank, the same rows, writing `path`."""
    return [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--seq-lens", args.seq_lens,
            "--phases", args.phases, "--modes", args.modes, "--backends", args.backends, "--device", args.device,
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--commit", args.commit or _commit(),
            "--out", str(path.parent), "--name", path.stem, *args.overrides]


def ensure_baseline(args, rank: int, local_rank: int) -> list[dict] | None:
    """The 1-GPU rows of --baseline; rank 0 measures them first when the file is missing (the other
    ranks wait for its word through the file system: no process group exists yet)."""
    if not args.baseline:
        return None
    path = Path(args.baseline).resolve()
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    done, failed = path.with_name(f".{path.name}.{run_id}.done"), path.with_name(f".{path.name}.{run_id}.failed")
    if rank == 0:
        if not path.is_file():
            env = {k: v for k, v in os.environ.items()
                   if k not in TORCHRUN_VARS and not k.startswith(("TORCHELASTIC_", "PET_"))}
            if args.device != "cpu":
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local_rank] if visible else str(local_rank)
            print(f"cp_train: measuring the 1-GPU baseline into {path}", flush=True)
            code = subprocess.run(baseline_command(args, path), cwd=REPO, env=env).returncode
            if code:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.touch()
                sys.exit(f"cp_train: the 1-GPU baseline failed with status {code}")
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()
    else:
        while not done.exists():
            if failed.exists():
                sys.exit("cp_train: the 1-GPU baseline failed (rank 0 says why)")
            time.sleep(1)
    return json.loads(path.read_text())["rows"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/paper-530m-98k.yaml")
    parser.add_argument("--seq-lens", default="196608,524288")
    parser.add_argument("--phases", default="lighthouse,dense")
    parser.add_argument("--exchanges", default="allgather,ring", help="Lighthouse exchanges (Lighthouse rows under CP)")
    parser.add_argument("--modes", default="selective+compile",
                        help="comma-separated activation checkpointing modes (none, full, selective), each optionally "
                             "+compile")
    parser.add_argument("--backends", default="auto", help="comma-separated model.attention_backend values")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel degree; CP = world size / dp (default 1)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo ranks, checks the script")
    parser.add_argument("--warmup", type=int, default=1, help="steps after the first, not timed")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--baseline", help="JSON of this script's 1-GPU rows; measured first (by rank 0) if missing")
    parser.add_argument("--name", default="cp_train", help="output file stem")
    parser.add_argument("--commit", default=None, help="commit to report when the tree has no .git")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args()
    lists = {name: getattr(args, name).split(",") for name in ("seq_lens", "phases", "exchanges", "modes", "backends")}
    bad = [m for m in lists["modes"] if _mode(m)[0] not in ("none", "full", "selective") or m.count("+") > 1
           or ("+" in m and not m.endswith("+compile"))]
    checks = {"phases": PHASES, "exchanges": EXCHANGES, "backends": BACKENDS}
    for name, allowed in checks.items():
        unknown = [v for v in lists[name] if v not in allowed]
        if unknown:
            parser.error(f"--{name}: {', '.join(unknown)} not among {', '.join(allowed)}")
    if bad:
        parser.error(f"--modes: {', '.join(bad)}: each is none, full or selective, optionally +compile")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dp < 1 or world % args.dp:
        parser.error(f"--dp {args.dp} must divide the world size {world}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (--device cpu runs gloo ranks on the CPU)")
        for key, value in GPU_ENV.items():
            os.environ.setdefault(key, value)
    cp = world // args.dp
    # The config's own validation, for every row, before any rank does any work.
    for n in lists["seq_lens"]:
        for phase in lists["phases"]:
            row_config(args, int(n), phase, lists["exchanges"][0] if phase == "lighthouse" else "-",
                       lists["modes"][0], lists["backends"][0], cp)

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    baseline = ensure_baseline(args, rank, local_rank)
    device = local_device(args.device)
    init_distributed(device)
    dp, cp = resolve_degrees(row_config(args, int(lists["seq_lens"][0]), "dense", "-", lists["modes"][0],
                                        lists["backends"][0], cp), world)
    layout = init_parallel_layout(dp, cp)
    cfg = load_config(args.config, args.overrides)
    meta = {"hardware": _hardware(device, world), "gpus": world, "dp": dp, "cp": cp,
            "commit": args.commit or _commit(), "command": " ".join(
                (["torchrun", f"--nproc-per-node {world}"] if "TORCHELASTIC_RUN_ID" in os.environ else ["python"])
                + [os.path.relpath(Path(__file__).resolve(), REPO), *sys.argv[1:]]),
            "config": args.config, "overrides": args.overrides, "zero_stage": cfg.parallel.zero_stage,
            "micro_batch": cfg.data.micro_batch, "baseline": _shown(args.baseline) if args.baseline else None}
    rows = []
    for n in lists["seq_lens"]:
        for phase in lists["phases"]:
            exchanges = lists["exchanges"] if phase == "lighthouse" and cp > 1 else ["-"]
            for exchange in exchanges:
                for mode in lists["modes"]:
                    for backend in lists["backends"]:
                        try:
                            row = measure(args, layout, device, int(n), phase, exchange, mode, backend)
                        except torch.cuda.OutOfMemoryError:
                            if world > 1:
                                raise  # the other ranks wait in a collective: no row can follow
                            row = {"seq_len": int(n), "phase": phase, "exchange": exchange, "mode": mode,
                                   "backend": backend, "gpus": 1, "dp": 1, "cp": 1, "error": "out of memory"}
                            gc.collect()
                            torch.cuda.empty_cache()
                        rows.append(row)
                        if baseline is not None:
                            add_ratios(rows, baseline)
                        if rank == 0:
                            print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
                            write(args, meta, rows)
    if rank == 0:
        print((Path(args.out) / f"{args.name}.md").read_text())
    dist.barrier()
    close_distributed(clean=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
