"""Peak memory and step time of lh-train's step with the chunked loss head against the head that
materializes every logit (`cross_entropy_reference`, the "before"), per vocabulary and context.

    python benchmarks/loss_memory.py --out benchmarks/results
    python benchmarks/loss_memory.py --vocabs 151936 --seq-lens 131072 --heads chunked
    python benchmarks/loss_memory.py --tiny --device cpu --out /tmp/loss_memory   # checks the script

The step is lh-train's own (`TrainStep` over DeepSpeed), built by benchmarks/train_throughput.py's
`lh_dist_step_fn`. Model: SmolLM2-135M's shape (30 layers, dim 576, 9 heads, 3 KV heads, SwiGLU 1536,
tied embeddings) with model.vocab_size set per row; everything else from --config (default: the
paper's config: ZeRO 1, selective checkpointing with compile, AdamW). Dense attention, B=1, random
tokens. --tiny swaps in a small eager model, contexts and vocabularies that a CPU runs in seconds;
extra `section.field=value` arguments override every row's config last.

Each row times --steps steps after the first step (compilation included, reported apart) and
--warmup more, and reports the median and the peak GPU memory (torch.cuda.max_memory_allocated,
net of what earlier rows left allocated). A row that runs out of GPU memory is recorded as OOM and
the next row follows. Writes <name>.md (hardware, torch, commit, command, table) and <name>.json
after every row, its rows ordered by vocabulary, context and head.
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

from lh_dist.config import load_config
from lh_dist.model.loss import default_chunk_rows
from lh_dist.parallel.distributed import close_distributed, init_distributed
from train_throughput import lh_dist_step_fn

REPO = Path(__file__).resolve().parents[1]
HEADS = ("chunked", "reference")
SMOLLM2_135M = ["model.n_layers=30", "model.dim=576", "model.n_heads=9", "model.n_kv_heads=3",
                "model.ffn_hidden=1536", "model.tie_embeddings=true"]
# --tiny: a model, contexts and vocabularies for a CPU check of the script (eager, no recomputation).
TINY_MODEL = ["model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
              "model.tie_embeddings=true", "model.attention_backend=math", "parallel.activation_checkpointing=none",
              "parallel.compile=false"]
TINY_SEQ_LENS, TINY_VOCABS, TINY_CHUNK_ROWS = "256,512", "512,1024", 96


def row_config(args, vocab: int, seq_len: int):
    overrides = [*(TINY_MODEL if args.tiny else SMOLLM2_135M), f"model.vocab_size={vocab}", f"data.seq_len={seq_len}",
                 f"device={args.device}", "parallel.cp_degree=1", "schedule.lighthouse_steps=0", *args.overrides]
    return load_config(args.config, overrides)


def measure(args, vocab: int, seq_len: int, head: str, device: torch.device) -> dict:
    """One row: lh-train's step on one sample of seq_len random tokens with the given head."""
    cfg = row_config(args, vocab, seq_len)
    cuda = device.type == "cuda"
    torch._dynamo.reset()  # each row compiles from scratch, so its first step shows the cost
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    left_over = torch.cuda.memory_allocated(device) if cuda else 0  # DeepSpeed keeps earlier rows' engines
    torch.manual_seed(cfg.seed)
    step, model = lh_dist_step_fn(cfg, device, "dense")
    model.output.materialize_logits = head == "reference"
    model.output.chunk_rows = args.chunk_rows
    tokens = torch.randint(0, vocab, (cfg.data.micro_batch, seq_len + 1), device=device)
    times = []
    for _ in range(1 + args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(tokens)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[1 + args.warmup:])
    return {"first_step_s": times[0], "step_s": median, "tokens_per_s": cfg.data.micro_batch * seq_len / median,
            "peak_mem_gib": (torch.cuda.max_memory_allocated(device) - left_over) / 2**30 if cuda else None,
            "times": times}


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, Python {platform.python_version()}"
    return f"CPU, {os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}"


def write(args, meta: dict, rows: list[dict]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["vocab"], r["seq_len"], HEADS.index(r["head"])))
    (out / f"{args.name}.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))
    overrides = " with " + " ".join(meta["overrides"]) if meta["overrides"] else ""
    lines = [
        "# Loss head: chunked cross-entropy against all logits at once",
        "",
        f"- hardware: {meta['hardware']}; torch {meta['torch']}",
        f"- commit: {meta['commit']}",
        f"- command: `{meta['command']}`",
        f"- model: {meta['model']}; config {meta['config']}{overrides}"
        f" (ZeRO stage {meta['zero_stage']}, checkpointing {meta['activation_checkpointing']}, compile "
        f"{meta['compile']}); lh-train's step (`TrainStep`), dense attention, B={meta['micro_batch']}; median of "
        f"{args.steps} steps after the first step and {args.warmup} more",
        "- heads: chunked = `LMHead`'s chunked loss (chunk rows as shown); reference = `cross_entropy_reference`, "
        "every logit of the sequence materialized",
        "",
        "| vocabulary | context | head | chunk rows | fp32 logits (GiB) | first step (s) | step (s) | tokens/s "
        "| peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r['vocab']:,}", f"{r['seq_len']:,}", r["head"], f"{r['chunk_rows']:,}" if r["chunk_rows"] else "-",
                 f"{r['logits_gib']:.3g}"]
        if "error" in r:
            cells += [r["error"]] * 4
        else:
            mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            cells += [f"{r['first_step_s']:.2f}", f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}", mem]
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/paper-530m-98k.yaml")
    parser.add_argument("--vocabs", default=None, help="comma-separated model.vocab_size values (default 49152,151936)")
    parser.add_argument("--seq-lens", default=None, help="comma-separated contexts (default 65536,131072)")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated: chunked, reference")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="rows per chunk of the chunked head (default: LMHead's, from the vocabulary)")
    parser.add_argument("--tiny", action="store_true", help="a small eager model, contexts and vocabularies (CPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--warmup", type=int, default=1, help="steps after the first, not timed")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--name", default="loss_memory", help="output file stem")
    parser.add_argument("--commit", default=None, help="commit to report when the tree has no .git")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args()
    if args.tiny and args.chunk_rows is None:
        args.chunk_rows = TINY_CHUNK_ROWS  # several chunks per sequence even at these sizes
    vocabs = [int(v) for v in (args.vocabs or (TINY_VOCABS if args.tiny else "49152,151936")).split(",")]
    seq_lens = [int(n) for n in (args.seq_lens or (TINY_SEQ_LENS if args.tiny else "65536,131072")).split(",")]
    heads = args.heads.split(",")
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        parser.error(f"--heads: {', '.join(unknown)} not among {', '.join(HEADS)}")
    if args.chunk_rows is not None and args.chunk_rows < 1:
        parser.error(f"--chunk-rows must be a positive integer, got {args.chunk_rows}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (--device cpu with --tiny checks the script)")
    for v in vocabs:  # every row's config is valid before any row runs
        for n in seq_lens:
            row_config(args, v, n)

    device = torch.device(args.device)
    init_distributed(device)
    cfg = row_config(args, vocabs[0], seq_lens[0])
    meta = {"hardware": _hardware(device), "torch": torch.__version__, "commit": args.commit or _commit(),
            "command": " ".join(["python", os.path.relpath(Path(__file__).resolve(), REPO), *sys.argv[1:]]),
            "model": "tiny (--tiny)" if args.tiny else "SmolLM2-135M shape", "config": args.config,
            "overrides": args.overrides, "zero_stage": cfg.parallel.zero_stage,
            "activation_checkpointing": cfg.parallel.activation_checkpointing, "compile": cfg.parallel.compile,
            "micro_batch": cfg.data.micro_batch}
    rows = []
    # Every chunked row first: a reference row that runs out of memory may leave some of it held.
    for head in sorted(heads, key=HEADS.index):
        for v in vocabs:
            for n in seq_lens:
                row = {"vocab": v, "seq_len": n, "head": head, "logits_gib": n * v * 4 / 2**30,
                       "chunk_rows": (args.chunk_rows or default_chunk_rows(v)) if head == "chunked" else None}
                try:
                    row |= measure(args, v, n, head, device)
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                gc.collect()  # the failed row's tensors, released with its traceback
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps({k: x for k, x in row.items() if k != "times"}), flush=True)
                write(args, meta, rows)
    close_distributed(clean=True)
    print((Path(args.out) / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
