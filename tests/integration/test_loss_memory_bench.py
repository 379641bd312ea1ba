"""benchmarks/loss_memory.py --tiny on the CPU: one row per (vocabulary, context, head) in both files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_loss_memory_benchmark_runs_tiny_on_cpu(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "loss_memory.py"), "--tiny", "--device", "cpu",
               "--warmup", "0", "--steps", "1", "--out", str(tmp_path)]
    r = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "loss_memory.json").read_text())
    assert result["torch"] == torch.__version__ and result["commit"] and "--tiny" in result["command"]
    cells = [(row["vocab"], row["seq_len"], row["head"]) for row in result["rows"]]
    assert cells == [(v, n, h) for v in (512, 1024) for n in (256, 512) for h in ("chunked", "reference")]
    for row in result["rows"]:
        assert "error" not in row and row["step_s"] > 0 and row["first_step_s"] > 0
        assert row["logits_gib"] == row["seq_len"] * row["vocab"] * 4 / 2**30
        assert row["chunk_rows"] == (96 if row["head"] == "chunked" else None)
    table = (tmp_path / "loss_memory.md").read_text()
    assert "hardware:" in table and "commit:" in table and "command: `python benchmarks/loss_memory.py --tiny" in table
    lines = [line for line in table.splitlines() if line.startswith("| 512 |") or line.startswith("| 1,024 |")]
    assert len(lines) == 8
    for line, (v, n, h) in zip(lines, cells):
        cells_md = [c.strip() for c in line.strip("|").split("|")]
        assert cells_md[:3] == [f"{v:,}", f"{n:,}", h] and float(cells_md[6]) > 0  # step (s)
