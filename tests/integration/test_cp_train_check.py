"""benchmarks/cp_train_check.py on CPU ranks (gloo): the reference pair, DP 2 x CP 2 stopped by SIGTERM
and resumed, losses within the derived tolerance. tests/unit/test_cp_train_check_rules.py checks its
tolerance rule, which pair each layout is compared with and its --references-only mode in one process.

One layout, the one with most ranks: it runs every path of the check (SIGTERM to torchrun, every rank's
status, resume, comparison), and 2-rank CP training against one rank is tests/integration/test_train.py's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cp_train_check_passes_on_cpu_ranks(tmp_path, stdlib_dataset):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cp_train_check.py"), "--cpu", "--data",
                        str(stdlib_dataset), "--work", str(tmp_path / "work"), "--out", str(out),
                        "--layouts", "dp2cp2"], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    record = json.loads((out / "cp_train_check.json").read_text())
    assert record["checks"] and all(c["ok"] for c in record["checks"])
    assert sorted(record["references"]) == ["ref-ga2-cpu_flash", "ref-ga2-math"]
    layout = record["layouts"]["dp2cp2"]
    assert layout["rank_statuses"] == ["75"] * 4 and layout["resumed_rank_statuses"] == ["0"] * 4
    assert layout["processes_left"] == []
    assert layout["resumed_at"] == layout["checkpoint_step"] >= layout["stop_after_step"] >= 4
    # Stopped in the Lighthouse phase, resumed there, switched to dense: every step's loss compared.
    assert layout["resumed_at"] < record["lighthouse_steps"]
    cmp = layout["comparison"]
    assert len(cmp["loss"]) == record["steps"] and cmp["steps_over"] == []
    assert max(cmp["abs_diff"]) > 0  # the CP run did reorder sums
    assert cmp["reference"] == "ref-ga2-math"
    table = (out / "cp_train_check.md").read_text()
    assert "| 12 | dense |" in table and "**FAIL**" not in table
