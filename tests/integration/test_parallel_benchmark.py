"""benchmarks/cp.py --smoke runs end to end on CPU with 2 gloo ranks and writes its table."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cp_benchmark_smoke(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "benchmarks" / "cp.py"), "--smoke", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "cp.md").read_text()
    for method in ("dense/ring", "lighthouse/cp-allgather", "lighthouse/cp-ring"):
        row = next(line for line in table.splitlines() if f"| {method} | 2 |" in line)
        median_ms = float(row.split("|")[5])
        assert median_ms > 0, row
