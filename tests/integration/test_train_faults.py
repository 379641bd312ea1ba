"""Non-finite losses, ZeRO stages and export, run in fresh single-rank processes (DeepSpeed + gloo)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[2]
SMALL = [*SMALL_RUN, "logging.eval_interval=100", "parallel.cp_degree=1"]


def run_script(body: str, tmp_path: Path, data: Path, *overrides: str) -> dict:
    """Run a Trainer in a child process; the script leaves its findings as JSON in `result`."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        from lh_dist.config import load_config
        from lh_dist.train.loop import Trainer
        cfg = load_config({str(REPO / 'configs/tiny-cpu.yaml')!r},
                          {[f'data.path={data}', f'logging.run_dir={tmp_path / "run"}', *SMALL, *overrides]!r})
        result = {{}}
    """) + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(result))\n"
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())})
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, r.stdout + r.stderr
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("stage", [0, 3])
def test_nonfinite_loss_skips_the_step_then_aborts(tmp_path, stdlib_dataset, stage):
    result = run_script("""
        trainer = Trainer(cfg, resume="none")
        real_loss = trainer.step_fn.loss
        poison = {3}
        def loss(*a):
            out = real_loss(*a)
            return out * float("nan") if trainer.step + 1 in poison else out
        trainer.step_fn.loss = loss
        snapshots, moments = [], []
        for step in range(4):
            trainer.step = step
            result[f"applied{step + 1}"] = trainer.train_step(1e-2).applied
            # ZeRO 3 keeps each rank's partition in ds_tensor; the module holds placeholders.
            snapshots.append(torch.cat([getattr(p, "ds_tensor", p).detach().flatten().clone()
                                        for p in trainer.engine.module.parameters()]))
            opt = trainer.engine.ds.optimizer
            while not isinstance(opt, torch.optim.Optimizer):  # ZeRO wraps torch's AdamW
                opt = opt.optimizer
            moments.append(torch.cat([s[k].flatten().clone() for s in opt.state.values()
                                      for k in ("exp_avg", "exp_avg_sq")]))
        result["unchanged_on_nan"] = bool(torch.equal(snapshots[1], snapshots[2]))
        result["changed_otherwise"] = not torch.equal(snapshots[2], snapshots[3])
        result["moments_unchanged_on_nan"] = bool(torch.equal(moments[1], moments[2]))
        result["moments_changed_otherwise"] = not torch.equal(moments[2], moments[3])
        trainer.step = 4
        poison.update(range(5, 100))
        try:
            trainer.run()
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
    """, tmp_path, stdlib_dataset, "schedule.steps=20", "schedule.max_nonfinite_steps=3",
                        f"parallel.zero_stage={stage}")
    assert result["unchanged_on_nan"] and result["changed_otherwise"]
    assert result["moments_unchanged_on_nan"] and result["moments_changed_otherwise"]
    assert [result[f"applied{s}"] for s in range(1, 5)] == [True, True, False, True]
    assert result["error"].startswith("NonFiniteLossError: 3 non-finite losses in a row")
    assert "schedule.max_nonfinite_steps=3" in result["error"]


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_and_exports_to_hugging_face(tmp_path, stdlib_dataset, stage):
    from transformers import LlamaForCausalLM

    from lh_dist.config import load_config
    from lh_dist.model import Transformer
    from lh_dist.ops.attention import attention
    from lh_dist.checkpoint.format import load_model_state
    from lh_dist.hf.export import export

    result = run_script("""
        trainer = Trainer(cfg, resume="none")
        result["exit"] = trainer.run()
    """, tmp_path, stdlib_dataset, "schedule.steps=3", f"parallel.zero_stage={stage}", "checkpoint.interval=3")
    assert result["exit"] == 0
    folder = tmp_path / "run" / "checkpoints" / "step_00000003"
    out = export(folder, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2

    cfg = load_config(tmp_path / "run" / "config.yaml")
    ours = Transformer(cfg.model, [lambda q, k, v: attention(q, k, v, causal=True, backend="math")] * 2)
    ours.load_state_dict(load_model_state(folder))
    hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = torch.randint(0, 257, (1, 40))
    with torch.no_grad():
        expected = ours(tokens, torch.arange(40))
        got = hf(tokens).logits
    # Same fp32 weights and the same math; only summation order differs.
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
