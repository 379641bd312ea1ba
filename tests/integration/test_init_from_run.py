"""lh-train --init-from with real processes: a run from an imported model starts at step 0 with its weights
(on one rank, and on two CP ranks with ZeRO 3 and another RoPE base), a restarted job resumes instead of
starting over, the import's own run dir is no run to resume, and the trained model exports as the
imported architecture with its tokenizer.

Tolerance of the first loss: the trainer computes it in float32 (its CPU attention kernel, DeepSpeed's
engine), the reference in float64 on the same batch. A mean cross-entropy of about 6 nats over 256
tokens through two layers carries float32 rounding of a few 1e-6 relative (measured below 1e-5
absolute), and TensorBoard stores it in float32 (5e-7 here). 1e-4 holds that with room; a run from
fresh weights starts near ln(320) = 5.77, far from the imported model's loss (asserted).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lh_dist.data.loader import PackedLoader

from hf_models import hf_dataset, hf_run, lh_dist_model  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
RUN = ["data.seq_len=128", "data.micro_batch=2", "schedule.warmup_steps=1", "logging.log_interval=1",
       "logging.eval_interval=100", "logging.eval_batches=1", "checkpoint.interval=1", "device=cpu"]
TOL = 1e-4


def _train(imported: Path, run_dir: Path, data: Path, *overrides: str, nproc: int = 1):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc-per-node={nproc}"]
    cmd = [*launcher, "-m", "lh_dist.train.cli", "--config", str(imported / "config.yaml"), "--init-from",
           str(imported), f"logging.run_dir={run_dir}", f"data.path={data}", *RUN, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _first_batch_loss(imported: Path, data: Path, tmp_path: Path, overrides: list[str] = ()) -> float:
    """The imported model's mean loss on the run's first batch (the loader's order for seed 0), in float64."""
    loader = PackedLoader(str(data), "train", seq_len=128, micro_batch=2, dp_rank=0, dp_degree=1, seed=0,
                          cache_dir=str(tmp_path / "cache"))
    batch = next(loader)  # [2, 129]
    loader.close()
    with torch.no_grad():
        losses = lh_dist_model(imported, overrides)(batch[:, :-1], torch.arange(128), batch[:, 1:])  # [2, 128]
    return float(losses.mean())


def test_a_run_starts_from_the_imported_weights_and_a_restart_resumes(hf_run, hf_dataset, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lh_dist.hf.export import export

    source, imported = hf_run
    run_dir = tmp_path / "run"
    r = _train(imported, run_dir, hf_dataset, "schedule.steps=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "starting at step 0 from the weights of" in r.stdout
    expected = _first_batch_loss(imported, hf_dataset, tmp_path)
    assert abs(expected - 5.77) > 0.1  # not what fresh weights give
    assert abs(_losses(run_dir)[1] - expected) <= TOL
    assert (run_dir / "hf" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()

    # The job starts again with the same command line: it continues the run, it does not start over.
    r = _train(imported, run_dir, hf_dataset, "schedule.steps=2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the run dir already holds step_00000001; resuming that run instead of starting over" in r.stdout
    assert "resumed from" in r.stdout and "starting at step 0" not in r.stdout
    assert sorted(_losses(run_dir)) == [1, 2]

    out = export(run_dir, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    generated = model.generate(**tok("def main():", return_tensors="pt"))
    assert generated.shape[1] > len(tok("def main():").input_ids)
    assert f"| initial weights | `{source}` (LlamaForCausalLM, imported by lh-import) |" in (
        out / "README.md").read_text()

    # A run from this one's weights: its card starts from this run's step 2, which started from the import.
    chain = tmp_path / "chain"
    r = _train(run_dir, chain, hf_dataset, "schedule.steps=1")
    assert r.returncode == 0, r.stdout + r.stderr
    card = (export(chain, tmp_path / "exported-chain") / "README.md").read_text()
    assert (f"| initial weights | `{run_dir / 'checkpoints' / 'step_00000002'}` (step 2 of another run, which "
            f"started from `{source}` (LlamaForCausalLM, imported by lh-import)) |") in card


def test_two_cp_ranks_with_zero3_and_another_rope_base(hf_run, hf_dataset, tmp_path):
    _, imported = hf_run
    r = _train(imported, tmp_path / "cp", hf_dataset, "schedule.steps=1", "parallel.cp_degree=2",
               "parallel.zero_stage=3", "model.rope_theta=20000", nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    # The changed base is named, the source's value first (hf_models.KINDS["llama"] has 5000).
    assert r.stdout.count("model settings differ from the source's (source -> this run): model.rope_theta "
                          "5000.0 -> 20000.0\n") == 1, r.stdout
    # Under CP the logged loss is the mean of the two ranks' means over equally many tokens: the batch's mean.
    expected = _first_batch_loss(imported, hf_dataset, tmp_path, ["model.rope_theta=20000"])
    assert abs(_first_batch_loss(imported, hf_dataset, tmp_path) - expected) > 10 * TOL  # the base matters
    assert abs(_losses(tmp_path / "cp")[1] - expected) <= TOL


def test_the_imported_run_dir_is_no_run_to_resume(hf_run, hf_dataset, tmp_path):
    # Training in the import's own run dir would resume its weights-only step 0: refused, saying what to do.
    _, imported = hf_run
    r = _train(imported, imported, hf_dataset)
    assert r.returncode == 2
    assert "holds imported weights without training state" in r.stderr and r.stderr.count("\n") == 1
