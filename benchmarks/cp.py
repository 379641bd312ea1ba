"""Context-parallel attention benchmark: one attention layer, forward + backward.

Dense: single-GPU SDPA, our ring attention, and PyTorch's experimental
context_parallel. Lighthouse: single GPU, and under CP with each K/V exchange.
Each W-GPU run also times the single-GPU baselines (on rank 0) so that its
table is self-contained; scaling efficiency = T_single / (W * T_cp).

    torchrun --standalone --nproc-per-node 1 benchmarks/cp.py
    torchrun --standalone --nproc-per-node 2 benchmarks/cp.py
    torchrun --standalone --nproc-per-node 2 benchmarks/cp.py --smoke   # CPU + gloo, tiny N, seconds

Writes benchmarks/results/cp_<device>_<W>x.json and rebuilds benchmarks/results/cp.md
from every such JSON file there (--smoke writes under /tmp instead).
"""

import argparse
import contextlib
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lh_dist.ops.lighthouse import LighthouseParams, lighthouse_attention
from lh_dist.parallel.lighthouse_cp import lighthouse_cp_attention
from lh_dist.parallel.ring_attention import ring_attention
from lh_dist.parallel.sharding import zigzag_shard

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_RESULTS = Path("/tmp/lh_dist_cp_smoke")
MiB = 2**20


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")],
                        default=[2**17, 2**18, 2**19, 2**20], help="comma-separated global sequence lengths")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    # Lighthouse: 3 levels of pooling 4 and topk 4096 are valid from N = 64K up.
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--pooling", type=int, default=4)
    parser.add_argument("--topk", type=int, default=4096)
    parser.add_argument("--lighthouse-backend", default="auto",
                        help="Lighthouse select/gather/scatter: auto|reference|triton")
    parser.add_argument("--methods", default="all", help="comma-separated subset of METHODS, or 'all'")
    parser.add_argument("--target-seconds", type=float, default=8.0,
                        help="timed iterations per case ~ target / step time, clamped to [3, 20]")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny shapes on CPU with gloo, results in {SMOKE_RESULTS}; checks the script")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"default {RESULTS}")
    args = parser.parse_args()
    if args.smoke:
        args.seq_lens, args.heads, args.kv_heads, args.head_dim = [2048], 2, 1, 16
        args.levels, args.pooling, args.topk, args.target_seconds = 2, 2, 1024, 0.0
    if args.out_dir is None:
        args.out_dir = SMOKE_RESULTS if args.smoke else RESULTS
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, group, target_seconds):
    """Median over iterations of the slowest rank's time for step(); the warm-up step sets the count."""
    dist.barrier(group)
    start = time.perf_counter()
    step()
    sync(device)
    warmup = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)  # NCCL: on device
    dist.all_reduce(warmup, op=dist.ReduceOp.MAX, group=group)
    iters = max(3, min(20, int(target_seconds / max(warmup.item(), 1e-6))))
    times = []
    for _ in range(iters):
        dist.barrier(group)
        start = time.perf_counter()
        step()
        sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(elapsed.item())
    return statistics.median(times), iters


def make_inputs(n, args, device, dtype):
    """Full-sequence q [1, N, H, D], k, v [1, N, Hkv, D], dout; identical on every rank (same seed)."""
    generator = torch.Generator(device=device).manual_seed(0)
    shape_q, shape_kv = (1, n, args.heads, args.head_dim), (1, n, args.kv_heads, args.head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype, generator=generator)
    k = torch.randn(shape_kv, device=device, dtype=dtype, generator=generator)
    v = torch.randn(shape_kv, device=device, dtype=dtype, generator=generator)
    dout = torch.randn(shape_q, device=device, dtype=dtype, generator=generator)
    return q, k, v, dout


def fwd_bwd(fn, q, k, v, dout):
    """A step closure: fresh leaf copies of q, k, v; forward fn, backward dout."""
    def step():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        fn(*leaves).backward(dout)
    return step


# ------------------------------------------------------------------ methods
# Each returns (step, bytes sent per rank per fwd+bwd or None if not modelled).


def dense_single(n, args, ctx):
    q, k, v, dout = make_inputs(n, args, ctx["device"], ctx["dtype"])

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=args.heads != args.kv_heads).transpose(1, 2)

    return fwd_bwd(sdpa, q, k, v, dout), 0


def kv_bytes(tokens, args, element_size):
    return 2 * tokens * args.kv_heads * args.head_dim * element_size


def ring_bytes(local_tokens, args, world, element_size):
    """K/V move W-1 times forward and W-1 times backward; fp32 dK/dV move W times."""
    if world == 1:
        return 0
    return 2 * (world - 1) * kv_bytes(local_tokens, args, element_size) + world * kv_bytes(local_tokens, args, 4)


def dense_ring(n, args, ctx):
    world, rank = ctx["world"], ctx["rank"]
    shards = [zigzag_shard(x, 1, world, rank).contiguous() for x in make_inputs(n, args, ctx["device"], ctx["dtype"])]
    step = fwd_bwd(lambda q, k, v: ring_attention(q, k, v, ctx["group"]), *shards)
    return step, ring_bytes(n // world, args, world, shards[0].element_size())


def dense_torch_cp(n, args, ctx):
    if ctx["device"].type != "cuda":
        raise RuntimeError("PyTorch context_parallel patches the CUDA SDPA kernels only")
    if ctx["world"] == 1:
        raise RuntimeError("skipped on 1 GPU (it is plain SDPA there)")
    from torch.distributed.tensor.experimental import context_parallel

    mesh = ctx["mesh"]
    group = args.heads // args.kv_heads
    q, k, v, dout = (x.transpose(1, 2).contiguous() for x in make_inputs(n, args, ctx["device"], ctx["dtype"]))
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # its SDPA path has no GQA
    buffers = [q, k, v, dout]
    # Shards the buffers in place (head-tail load balancing) and routes SDPA to its ring
    # while the timing runs; entered once so that sharding is not timed.
    ctx["stack"].enter_context(
        context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2] * 4, no_restore_buffers=set(buffers)))

    def step():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        F.scaled_dot_product_attention(*leaves, is_causal=True).backward(dout)

    return step, None


def lighthouse_params(args):
    return LighthouseParams(levels=args.levels, pooling=args.pooling, topk=args.topk, backend=args.lighthouse_backend)


def lighthouse_single(n, args, ctx):
    q, k, v, dout = make_inputs(n, args, ctx["device"], ctx["dtype"])
    return fwd_bwd(lambda q, k, v: lighthouse_attention(q, k, v, lighthouse_params(args)), q, k, v, dout), 0


def gathered_tokens(n, args):
    return lighthouse_params(args).gathered_length(n)


def lighthouse_cp(exchange):
    def build(n, args, ctx):
        world, rank = ctx["world"], ctx["rank"]
        shards = [zigzag_shard(x, 1, world, rank).contiguous()
                  for x in make_inputs(n, args, ctx["device"], ctx["dtype"])]
        step = fwd_bwd(lambda q, k, v: lighthouse_cp_attention(
            q, k, v, ctx["group"], lighthouse_params(args), exchange=exchange), *shards)
        local = gathered_tokens(n, args) // world
        element = shards[0].element_size()
        spill = 0 if world == 1 else 2 * 2 * lighthouse_params(args).spill * args.heads * args.head_dim * 4
        if exchange == "ring":
            return step, ring_bytes(local, args, world, element) + spill
        # all-gather K/V (each rank sends its part to W-1 ranks), reduce-scatter fp32 dK/dV.
        gather = (world - 1) * kv_bytes(local, args, element) + (world - 1) * kv_bytes(local, args, 4)
        return step, gather + spill
    return build


METHODS = {  # name -> (builder, runs on rank 0 only)
    "dense/sdpa-1gpu": (dense_single, True),
    "dense/ring": (dense_ring, False),
    "dense/torch-cp": (dense_torch_cp, False),
    "lighthouse/1gpu": (lighthouse_single, True),
    "lighthouse/cp-allgather": (lighthouse_cp("allgather"), False),
    "lighthouse/cp-ring": (lighthouse_cp("ring"), False),
}


def run_case(name, n, args, ctx):
    builder, single = METHODS[name]
    world, rank, device = ctx["world"], ctx["rank"], ctx["device"]
    row = dict(method=name, seq_len=n, gpus=1 if single else world, world=world)
    if single and world > 1:
        # Rank 0 times it alone; the others wait and then receive its row.
        rows = [None]
        if rank == 0:
            rows[0] = run_case(name, n, args, dict(ctx, world=1, rank=0, group=ctx["solo"]))
            rows[0]["world"] = world
        dist.broadcast_object_list(rows, src=0, group=ctx["group"])
        return rows[0]
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        stack = contextlib.ExitStack()
        ctx = dict(ctx, stack=stack)
        with stack:
            step, comm = builder(n, args, ctx)
            seconds, iters = time_steps(step, device, ctx["group"], args.target_seconds)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        row.update(ms=1e3 * seconds, iters=iters, peak_gib=peak,
                   comm_mib=None if comm is None else comm / MiB)
    except Exception as error:  # noqa: BLE001 - record OOM / unsupported and go on
        row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_efficiency(rows):
    baseline = {(r["seq_len"], r["method"].split("/")[0]): r.get("ms") for r in rows if r["gpus"] == 1
                and r["method"] in ("dense/sdpa-1gpu", "lighthouse/1gpu")}
    for r in rows:
        single = baseline.get((r["seq_len"], r["method"].split("/")[0]))
        if r.get("ms") and single:
            r["efficiency"] = single / (r["gpus"] * r["ms"])


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def write_markdown(out_dir):
    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("cp_*.json"))]
    lines = ["# Context-parallel attention: one layer, forward + backward", "",
             "Generated by `benchmarks/cp.py`. Times are medians of the slowest rank per step. "
             "Efficiency = T(1 GPU) / (GPUs x T). Comm = bytes each rank sends per fwd+bwd "
             "(modelled from the algorithm; '-' where not modelled).", ""]
    for run in runs:
        meta = run["meta"]
        lines += [f"## {meta['device']} x{meta['world']} ({meta['date']})", "",
                  f"B=1, H={meta['heads']}, Hkv={meta['kv_heads']}, D={meta['head_dim']}, {meta['dtype']}; "
                  f"Lighthouse L={meta['levels']}, p={meta['pooling']}, topk={meta['topk']}; "
                  f"torch {meta['torch']}, backend {meta['backend']}.", "",
                  "| N | method | GPUs | S (gathered) | median ms | efficiency | peak GiB/GPU | comm MiB/rank "
                  "| iters |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            gathered = str(r.get("gathered", "")) if r["method"].startswith("lighthouse") else ""
            if "error" in r:
                lines.append(f"| {r['seq_len']} | {r['method']} | {r['gpus']} | {gathered} | {r['error']} | | | | |")
                continue
            lines.append(f"| {r['seq_len']} | {r['method']} | {r['gpus']} | {gathered} | {r['ms']:.2f} | "
                         f"{_fmt(r.get('efficiency'), '.2f')} | {_fmt(r.get('peak_gib'), '.2f')} | "
                         f"{_fmt(r.get('comm_mib'), '.1f')} | {r['iters']} |")
        lines.append("")
    (out_dir / "cp.md").write_text("\n".join(lines))


def main():
    args = parse_args()
    use_cuda = torch.cuda.is_available() and not args.smoke
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    ctx = dict(world=world, rank=rank, device=device, group=dist.group.WORLD,
               dtype=torch.bfloat16 if use_cuda else torch.float32)
    if use_cuda:
        from torch.distributed.device_mesh import init_device_mesh
        ctx["mesh"] = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    # A group of rank 0 alone for the single-GPU baselines (new_group is collective).
    ctx["solo"] = dist.new_group([0]) if world > 1 else dist.group.WORLD
    names = list(METHODS) if args.methods == "all" else args.methods.split(",")
    for name in names:
        if name not in METHODS:
            raise ValueError(f"--methods must name entries of {list(METHODS)}, got {name!r}")

    rows = []
    for n in args.seq_lens:
        for name in names:
            row = run_case(name, n, args, ctx)
            if name.startswith("lighthouse"):
                row["gathered"] = gathered_tokens(n, args)
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    add_efficiency(rows)

    if rank == 0:
        device_name = torch.cuda.get_device_name(device) if use_cuda else "cpu-gloo"
        meta = dict(device=device_name, world=world, date=datetime.date.today().isoformat(),
                    heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                    dtype=str(ctx["dtype"]).removeprefix("torch."), levels=args.levels, pooling=args.pooling,
                    topk=args.topk, torch=torch.__version__, backend=backend)
        tag = "smoke" if args.smoke else device_name.replace(" ", "-")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"cp_{tag}_{world}x.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        write_markdown(args.out_dir)
        print((args.out_dir / "cp.md").read_text())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
