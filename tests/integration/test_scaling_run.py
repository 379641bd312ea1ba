"""benchmarks/scaling.py for real on CPU, tiny sizes: every cell in a process of its own, the rows
it records (dense, and Lighthouse with activation offloading), and its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_tiny_grid_on_cpu(tmp_path):
    # --tiny: 3 layers of dim 64 (tiny flavors tile 512 tokens); no compile on CPU.
    cmd = [sys.executable, str(REPO / "benchmarks/scaling.py"), "--device", "cpu", "--tiny", "--set",
           "parallel.compile=false", "--series", "dense,lighthouse-1m+offload", "--seq-lens", "512",
           "--offload-from", "512", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "scaling.json").read_text())
    rows = {row["series"]: row for row in data["rows"]}
    assert set(rows) == {"dense", "lighthouse-1m+offload"}
    for row in rows.values():
        assert row["status"] == "ok" and row["n"] == 512, row
        assert len(row["times"]) == 2 and row["step_s"] == row["times"][1]  # the first step, then one timed
        assert row["tokens_per_s"] == 512 / row["step_s"]
        assert 0 < row["host_rss_peak_gib"] < 64  # measured in the cell's own process
    # The offloaded block inputs: 3 layers x 512 tokens x dim 64, fp32 (the CPU engine's precision).
    assert rows["lighthouse-1m+offload"]["host_offload_peak_gib"] * 2**30 == 3 * 512 * 64 * 4
    assert rows["lighthouse-1m+offload"]["gathered_length"] == 512 // 4 + 2 * 2 * 128
    md = (tmp_path / "scaling.md").read_text()
    assert "| 512 | dense | ok |" in md and "| 512 | lighthouse-1m+offload | ok |" in md
    assert data["runs"][0]["command"].startswith("python benchmarks/scaling.py --device cpu --tiny")
    assert (tmp_path / "scaling.png").stat().st_size > 0
