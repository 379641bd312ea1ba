"""benchmarks/qk_norm_scores.py on a two-step run: lh-train's run, every variant's loss, both files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_qk_norm_scores_benchmark_runs_a_tiny_model(tmp_path, stdlib_dataset):
    shutil.copytree(stdlib_dataset, tmp_path / "work" / "data")  # reused as the benchmark's own dataset
    command = [sys.executable, str(REPO / "benchmarks" / "qk_norm_scores.py"), "--steps", "2", "--dim", "32",
               "--micro-batch", "1", "--val-samples", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "qk_norm_scores.json").read_text())
    assert result["trained_here"] and result["steps"] == 2 and result["val_samples"] == 2
    assert set(result["loss"]) == {"dense", "projections", "normalized", "unit_gain", "constant"}
    assert all(0 < mean < 10 for mean, _ in result["loss"].values())
    fresh = result["score_cv"]["fresh"]
    assert fresh["post"] == fresh["post_unit_gain"]  # a fresh QK-norm's gains are 1
    assert fresh["pre"][0] > 100 * fresh["post"][0]  # the norm removes nearly all of the spread
    assert "| Lighthouse, constant scores |" in (tmp_path / "qk_norm_scores.md").read_text()
