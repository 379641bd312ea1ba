"""How lh-train ends torch.distributed: a finished run and a stopped one destroy their process groups
(NCCL warns at exit otherwise), a failed one leaves gloo's to the exit and raises its own error.
One rank through lh-train's command line, in a fresh process, with the second step replaced."""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import SMALL_RUN
from lh_dist.train.loop import PREEMPTED_EXIT_CODE
from test_train import REPO, _env


@pytest.mark.parametrize("ending, expected", [
    ("finish", {"exit": 0, "initialized": False}),
    ("stop", {"exit": PREEMPTED_EXIT_CODE, "initialized": False}),
    # Aborting or destroying a gloo group would wait for collectives a failed rank's peers may never join.
    ("failure", {"raised": "injected failure", "initialized": True}),
])
def test_the_process_group_ends_with_the_run(tmp_path, stdlib_dataset, ending, expected):
    args = ["--config", str(REPO / "configs/tiny-cpu.yaml"), f"data.path={stdlib_dataset}",
            f"logging.run_dir={tmp_path / 'run'}", *SMALL_RUN, "parallel.cp_degree=1", "logging.eval_interval=100",
            "schedule.steps=3", "checkpoint.interval=100"]
    script = textwrap.dedent(f"""
        import json, os, signal
        import torch.distributed as dist
        from lh_dist.train.cli import main
        from lh_dist.train.loop import Trainer

        train_step = Trainer.train_step
        def second_step_replaced(self, lr):
            if self.step == 1 and {ending!r} == "stop":
                os.kill(os.getpid(), signal.SIGTERM)
            if self.step == 1 and {ending!r} == "failure":
                raise RuntimeError("injected failure")
            return train_step(self, lr)
        Trainer.train_step = second_step_replaced
        try:
            result = {{"exit": main({args!r})}}
        except RuntimeError as e:
            result = {{"raised": str(e)}}
        result["initialized"] = dist.is_initialized()
        print("RESULT " + json.dumps(result))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout + r.stderr
    assert json.loads(lines[-1][len("RESULT "):]) == expected, r.stdout + r.stderr
