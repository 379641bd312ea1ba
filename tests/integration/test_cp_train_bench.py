"""benchmarks/cp_train.py under torchrun on 2 CPU ranks (gloo): the 1-GPU baseline measured first by
rank 0, then every CP row, written as markdown and JSON with the ratio to the baseline."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]


def test_cp_train_benchmark_on_cpu_ranks(tmp_path):
    baseline = tmp_path / "cp_train_1gpu.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "benchmarks" / "cp_train.py"), "--device", "cpu", "--config", "configs/tiny-cpu.yaml",
               "--seq-lens", "1024", "--modes", "none", "--backends", "math", "--warmup", "0", "--steps", "2",
               "--out", str(tmp_path), "--baseline", str(baseline), *TINY_MODEL, "data.micro_batch=1",
               "lighthouse.dense_layers=[0]"]
    r = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    base = json.loads(baseline.read_text())
    assert [(row["phase"], row["cp"]) for row in base["rows"]] == [("lighthouse", 1), ("dense", 1)]
    result = json.loads((tmp_path / "cp_train.json").read_text())
    assert result["gpus"] == 2 and result["cp"] == 2 and result["dp"] == 1
    rows = result["rows"]
    assert [(row["phase"], row["exchange"]) for row in rows] == [("lighthouse", "allgather"), ("lighthouse", "ring"),
                                                                  ("dense", "-")]
    for row in rows:
        assert row["step_s"] > 0 and row["first_step_s"] > 0 and row["tokens_per_s_per_gpu"] > 0
        by = next(b for b in base["rows"] if b["phase"] == row["phase"])
        assert row["ratio_vs_1gpu"] == row["tokens_per_s_per_gpu"] / by["tokens_per_s_per_gpu"]
    table = (tmp_path / "cp_train.md").read_text()
    assert "| vs 1 GPU |" in table and "commit:" in table and "command:" in table
    lines = [line for line in table.splitlines() if line.startswith("| 1,024 |")]
    assert len(lines) == 3
    for line in lines:
        cells = [c.strip() for c in line.split("|")]
        assert float(cells[9].replace(",", "")) > 0 and float(cells[10]) > 0  # tokens/s per GPU, ratio
