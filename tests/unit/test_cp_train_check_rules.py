"""benchmarks/cp_train_check.py in this process: its tolerance rule on made-up curves, and, with stand-ins
for its runs, which runs it starts and which reference pair each layout is compared with.
tests/integration/test_cp_train_check.py runs the check for real on CPU ranks."""

import importlib.util
import json
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


def _main_with_stand_ins(tmp_path, monkeypatch, *args) -> tuple[list[str], dict]:
    """The check's main with stand-ins for what it starts: the config checks pass, every run ends with
    status 0 and a falling loss curve (a layout's a little off its references). Returns the runs started
    (references, then layouts) and the JSON record."""
    steps = check.CPU_PROFILE.steps
    started = []

    def run_all(runner, launches, width):
        started.extend(launch.name for launch in launches)
        return {launch.name: 0 for launch in launches}

    def stop_and_resume(runner, report, launch):
        started.append(launch.name)
        return {"name": launch.name}

    def read_losses(run_dir):
        offset = 1e-6 if run_dir.name.endswith("cpu_flash") else 2e-6 if not run_dir.name.startswith("ref") else 0
        return {s: 4.0 - 0.1 * s + offset for s in range(1, steps + 1)}

    monkeypatch.setattr(check.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 0))
    monkeypatch.setattr(check.Runner, "run_all", run_all)
    monkeypatch.setattr(check, "stop_and_resume", stop_and_resume)
    monkeypatch.setattr(check, "read_losses", read_losses)
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "lh_data.json").write_text("{}")
    argv = ["--cpu", "--data", str(data), "--work", str(tmp_path / "work"), "--out", str(out), "--commit", "abc1234",
            *args]
    assert check.main(argv) == 0
    return started, json.loads((out / "cp_train_check.json").read_text())


def test_each_layout_is_compared_with_the_pair_that_reads_its_samples(tmp_path, monkeypatch):
    # DP 2 x CP 2 reads two samples per step: its references take them one after the other (grad_accum 2).
    started, record = _main_with_stand_ins(tmp_path, monkeypatch, "--layouts", "cp2,dp2cp2")
    assert started == ["ref-ga1-math", "ref-ga1-cpu_flash", "ref-ga2-math", "ref-ga2-cpu_flash", "cp2", "dp2cp2"]
    assert record["layouts"]["cp2"]["comparison"]["reference"] == "ref-ga1-math"
    assert record["layouts"]["dp2cp2"]["comparison"]["reference"] == "ref-ga2-math"
    assert all(c["ok"] for c in record["checks"])


def test_references_only_runs_the_pair_and_no_layout(tmp_path, monkeypatch):
    started, record = _main_with_stand_ins(tmp_path, monkeypatch, "--layouts", "cp2", "--references-only")
    assert started == ["ref-ga1-math", "ref-ga1-cpu_flash"]
    assert sorted(record["references"]) == ["ref-ga1-cpu_flash", "ref-ga1-math"]
    assert record["layouts"] == {} and all(c["ok"] for c in record["checks"])
    report = (tmp_path / "out" / "cp_train_check.md").read_text()
    assert "## references" in report and report.count("| lighthouse |") == check.CPU_PROFILE.lighthouse_steps
