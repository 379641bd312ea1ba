"""benchmarks/cp_train_check.py on CPU ranks (gloo): references, CP 2 and DP 2 x CP 2 stopped by SIGTERM
and resumed, losses within the derived tolerance; and its tolerance rule on made-up curves."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("cp_train_check", REPO / "benchmarks" / "cp_train_check.py")
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # its dataclasses look their module up there
_spec.loader.exec_module(check)


def test_tolerance_is_twice_the_running_noise_plus_float32_ulps():
    a, b = [4.0, 3.0, 2.0], [4.0, 3.1, 2.0]
    tol = check.tolerances(a, b)
    ulps = [4 * check.FLOAT32_EPS * x for x in a]
    assert tol[0] == ulps[0]  # no difference yet: a few ulps of the loss
    assert abs(tol[1] - (0.2 + ulps[1])) < 1e-12
    assert abs(tol[2] - (0.2 + ulps[2])) < 1e-12  # the pair agrees again; the noise seen so far stays


def test_compare_fails_a_step_beyond_the_tolerance():
    report = check.Report()
    curves = {"a": [4.0, 3.0, 2.0], "b": [4.0, 3.1, 2.0], "cp": [4.0, 3.15, 2.25]}
    result = check.compare(report, "cp", ("a", "b"), curves, 3)
    assert result["steps_over"] == [3]  # 0.25 > 2 * 0.1; step 2's 0.15 is within
    assert [c.ok for c in report.checks] == [True, False]


def test_cp_train_check_passes_on_cpu_ranks(tmp_path, stdlib_dataset):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cp_train_check.py"), "--cpu", "--data",
                        str(stdlib_dataset), "--work", str(tmp_path / "work"), "--out", str(out),
                        "--layouts", "cp2,dp2cp2"], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    record = json.loads((out / "cp_train_check.json").read_text())
    assert record["checks"] and all(c["ok"] for c in record["checks"])
    for name, ranks in (("cp2", 2), ("dp2cp2", 4)):
        layout = record["layouts"][name]
        assert layout["rank_statuses"] == ["75"] * ranks and layout["resumed_rank_statuses"] == ["0"] * ranks
        assert layout["processes_left"] == []
        assert layout["resumed_at"] == layout["checkpoint_step"] >= layout["stop_after_step"] >= 4
        # Stopped in the Lighthouse phase, resumed there, switched to dense: every step's loss compared.
        assert layout["resumed_at"] < record["lighthouse_steps"]
        cmp = layout["comparison"]
        assert len(cmp["loss"]) == record["steps"] and cmp["steps_over"] == []
        assert max(cmp["abs_diff"]) > 0  # the CP run did reorder sums
    assert record["layouts"]["dp2cp2"]["comparison"]["reference"] == "ref-ga2-math"
    table = (out / "cp_train_check.md").read_text()
    assert "| 12 | dense |" in table and "**FAIL**" not in table


def test_references_only_runs_the_pair_and_no_layout(tmp_path, stdlib_dataset):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cp_train_check.py"), "--cpu", "--data",
                        str(stdlib_dataset), "--work", str(tmp_path / "work"), "--out", str(out),
                        "--layouts", "cp2", "--references-only"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((out / "cp_train_check.json").read_text())
    assert sorted(record["references"]) == ["ref-ga1-cpu_flash", "ref-ga1-math"]
    assert record["layouts"] == {}
    assert not (tmp_path / "work" / "runs" / "cp2").exists()  # no CP run was started
    report = (out / "cp_train_check.md").read_text()
    assert "## references" in report and report.count("| lighthouse |") == check.CPU_PROFILE.lighthouse_steps
