"""Where a real single-rank training stops: a stop signal that arrives during a save, Ctrl-C once and
twice, and a disk too full for the first checkpoint. Fresh processes (DeepSpeed + gloo), each with one function replaced."""

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import SMALL_RUN
from lh_dist.train.loop import PREEMPTED_EXIT_CODE
from test_train import REPO, _env
from test_train_faults import run_script


def test_a_stop_signal_during_a_save_exits_once_that_save_is_complete(tmp_path, stdlib_dataset):
    result = run_script("""
        import os, signal
        trainer = Trainer(cfg, resume="none")
        save = trainer.checkpointer.save
        def save_and_get_a_signal(engine, step, state):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # handled while step 2 is written
            return save(engine, step, state)
        trainer.checkpointer.save = save_and_get_a_signal
        result["exit"] = trainer.run()
        result["step"] = trainer.step
        result["checkpoints"] = sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir())
    """, tmp_path, stdlib_dataset, "schedule.steps=6", "checkpoint.interval=2")
    assert result == {"exit": PREEMPTED_EXIT_CODE, "step": 2, "checkpoints": ["step_00000002"]}


def test_ctrl_c_checkpoints_like_sigterm_and_a_second_one_stops_at_once(tmp_path, stdlib_dataset):
    body = """
        import os, signal
        trainer = Trainer(cfg, resume="none")
        train_step = trainer.train_step
        def step_with_ctrl_c(lr):
            if trainer.step == 1:  # handled while step 2 runs
                for _ in range(PRESSES):
                    os.kill(os.getpid(), signal.SIGINT)
            return train_step(lr)
        trainer.train_step = step_with_ctrl_c
        try:
            result["exit"] = trainer.run()
        except KeyboardInterrupt:
            result["exit"] = "KeyboardInterrupt"
        result["step"] = trainer.step
        result["checkpoints"] = sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir())
    """
    overrides = ("schedule.steps=6", "checkpoint.interval=4")
    once = run_script("PRESSES = 1\n" + textwrap.dedent(body), tmp_path / "once", stdlib_dataset, *overrides)
    assert once == {"exit": PREEMPTED_EXIT_CODE, "step": 2, "checkpoints": ["step_00000002"]}
    twice = run_script("PRESSES = 2\n" + textwrap.dedent(body), tmp_path / "twice", stdlib_dataset, *overrides)
    assert twice == {"exit": "KeyboardInterrupt", "step": 1, "checkpoints": []}


def test_a_disk_too_full_for_the_first_checkpoint_is_refused_before_the_first_step(tmp_path, stdlib_dataset):
    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "configs/tiny-cpu.yaml"), f"data.path={stdlib_dataset}",
            f"logging.run_dir={run_dir}", *SMALL_RUN, "parallel.cp_degree=1", "logging.eval_interval=100",
            "schedule.steps=4", "checkpoint.interval=2"]
    script = textwrap.dedent(f"""
        import shutil, sys
        disk_usage = shutil.disk_usage
        shutil.disk_usage = lambda path: disk_usage(path)._replace(free=100_000)  # less than a checkpoint
        from lh_dist.train.cli import main
        sys.exit(main({args!r}))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"lh-train: error: not enough free space for checkpoint step_00000002 in {run_dir / 'checkpoints'}: it "
        f"needs about "), r.stderr
    assert "step " not in r.stdout  # no step was trained
    assert sorted(p.name for p in Path(run_dir / "checkpoints").iterdir()) == []
