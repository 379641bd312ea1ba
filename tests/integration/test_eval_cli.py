"""`lh-eval` end to end on a tiny checkpoint written by `lh-train` (Lighthouse phase, then dense eval)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lh_dist.eval import runner as runner_module
from lh_dist.eval.cli import main, output_path
from lh_dist.eval.runner import ModelRunner

from conftest import TINY_MODEL
from spawn import spawn_ranks

REPO = Path(__file__).resolve().parents[2]
TINY = ["parallel.cp_degree=1", *TINY_MODEL, "data.seq_len=256", "data.micro_batch=1", "schedule.steps=2",
        "schedule.warmup_steps=1", "schedule.decay=constant", "schedule.lighthouse_steps=2",
        "lighthouse.levels=2", "lighthouse.pooling=2", "lighthouse.topk=128", "lighthouse.dense_layers=[0]",
        "checkpoint.interval=2", "logging.eval_batches=1", "logging.eval_interval=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, stdlib_dataset):
    """A run dir whose only checkpoint (step 2) was trained in the Lighthouse phase."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "lh_dist.train.cli", "--config", str(REPO / "configs/tiny-cpu.yaml"),
           f"data.path={stdlib_dataset}", f"logging.run_dir={run_dir}", *TINY]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir


def _png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_passkey_writes_heatmap_json_and_png(tiny_run, tmp_path):
    out = tmp_path / "pk"
    argv = ["passkey", str(tiny_run), "--lengths", "128,256", "--depths", "0,50,100", "--out", str(out),
            "--device", "cpu", "--batch-size", "5"]
    assert main(argv) == 0
    path = out / "step_00000002" / "passkey-128_256-depths0_50_100.json"
    assert output_path(argv) == path
    result = json.loads(path.read_text())
    assert result["step"] == 2 and result["trained_phase"] == "lighthouse" and result["eval_phase"] == "dense"
    assert result["lengths"] == [128, 256] and result["depths"] == [0, 50, 100]
    accuracy = np.asarray(result["accuracy"])
    assert accuracy.shape == (3, 2) and ((accuracy >= 0) & (accuracy <= 1)).all()
    assert np.asarray(result["predictions"]).shape == (3, 2, 10)
    assert result["mean"] == pytest.approx(accuracy.mean(), abs=1e-6)  # the JSON holds 6 digits
    assert result["run"] == "run"
    _png(path.with_suffix(".png"))


def test_passkey_default_lengths_and_output_folder(tiny_run):
    argv = ["passkey", str(tiny_run / "checkpoints" / "step_00000002"), "--depths", "50"]
    path = tiny_run / "eval" / "step_00000002" / "passkey-170_256-depths50.json"
    assert output_path(argv) == path  # 256 x {2/3, 1}; shorter ones cannot hold the prompt
    assert main(argv) == 0
    assert json.loads(path.read_text())["lengths"] == [170, 256]


def test_passkey_warns_about_lengths_beyond_training(tiny_run, tmp_path, capsys):
    assert main(["passkey", str(tiny_run), "--lengths", "200,600", "--depths", "50", "--out", str(tmp_path),
                 "--batch-size", "10"]) == 0
    out = capsys.readouterr()
    assert ("lh-eval: warning: --lengths 600 longer than the trained length 256 (data.seq_len): the model never "
            "saw those positions, and a dense forward pass over 600 tokens takes up to 5x as long as one over "
            "256") in out.err
    assert out.out.startswith("passkey: 1 depths x 2 lengths, 2 forward passes of up to 10 prompts, 8,000 tokens")


@pytest.mark.parametrize("double, expected", [("oracle", 1.0), ("uniform", 0.1)])
def test_passkey_cli_scores_logit_test_doubles(tiny_run, tmp_path, monkeypatch, double, expected):
    digit_ids = [ord(str(d)) for d in range(10)]

    def last_logits(self, prompts):
        logits = torch.zeros(prompts.shape[0], 257)
        if double == "oracle":
            for b, prompt in enumerate(prompts):
                needle = next(t for t in prompt.tolist() if t in digit_ids)
                logits[b, needle] = 1.0
        return logits

    monkeypatch.setattr(runner_module.ModelRunner, "last_logits", last_logits)
    assert main(["passkey", str(tiny_run), "--lengths", "200", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "step_00000002" / "passkey-200.json").read_text())
    assert np.allclose(result["accuracy"], expected) and result["mean"] == pytest.approx(expected)


@pytest.mark.parametrize("phase, spacing", [("dense", "linear"), ("lighthouse", "log")])
def test_loss_by_position(tiny_run, tmp_path, phase, spacing):
    argv = ["loss", str(tiny_run), "--batches", "3", "--micro-batch", "2", "--buckets", "4",
            "--spacing", spacing, "--phase", phase, "--out", str(tmp_path), "--device", "cpu", "--bits-per-byte"]
    assert main(argv) == 0
    path = tmp_path / "step_00000002" / f"loss-{phase}-{spacing}4-batches3x2.json"
    assert output_path(argv) == path
    result = json.loads(path.read_text())
    assert result["eval_phase"] == phase and result["seq_len"] == 256
    assert result["batches"] == 3 and result["sequences"] == 6 and result["tokens"] == 6 * 256
    buckets = result["buckets"]
    assert len(buckets) == 4 and buckets[0]["start"] == 0 and buckets[-1]["end"] == 256
    assert all(a["end"] == b["start"] for a, b in zip(buckets, buckets[1:]))
    weighted = sum(b["loss"] * b["tokens"] for b in buckets) / result["tokens"]
    assert weighted == pytest.approx(result["loss"], rel=1e-5)  # each value rounded to 6 digits
    assert 3.0 < result["loss"] < 7.0  # two steps from ln(257) = 5.55
    assert all(b["stderr"] > 0 for b in buckets)
    # Byte-level: every target is one byte except end-of-document tokens.
    assert 0 < result["bytes"] <= result["tokens"] and result["bytes"] == sum(b["bytes"] for b in buckets)
    nats = sum(b["loss"] * b["tokens"] for b in buckets)
    assert result["bits_per_byte"] == pytest.approx(nats / np.log(2) / result["bytes"], rel=1e-5)
    _png(path.with_suffix(".png"))


def test_loss_says_when_it_evaluates_less_than_asked(tiny_run, tmp_path, capsys):
    # 16 octaves over 256 positions: the first 8 would be under one position wide, so 9 buckets remain;
    # and the validation split holds fewer than 10,000 samples of 257 tokens.
    argv = ["loss", str(tiny_run), "--buckets", "16", "--spacing", "log", "--batches", "10000", "--out", str(tmp_path)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    result = json.loads(output_path(argv).read_text())
    assert len(result["buckets"]) == 9 and "9 buckets, not 16" in err
    assert result["batches"] < 10000 and f"{result['batches']} batches, not 10000" in err


def test_a_run_trained_under_cp_is_evaluated_on_one_device(tiny_run, tmp_path):
    # As if trained densely on two CP ranks; its Lighthouse settings (one tile of topk/128) cannot tile 4
    # zigzag chunks, but a Lighthouse evaluation on one device tiles the sequence for one rank.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["parallel"]["cp_degree"], config["schedule"]["lighthouse_steps"] = 2, 0
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    argv = ["loss", str(run), "--phase", "lighthouse", "--batches", "1", "--out", str(tmp_path / "eval"),
            "schedule.lighthouse_steps=2"]
    assert main(argv) == 0
    assert output_path(argv).is_file()


def test_outputs_never_overwrite_each_other_and_are_indexed(tiny_run, tmp_path):
    runs = [["loss", "--batches", "1", "--phase", "dense"], ["loss", "--batches", "1", "--phase", "lighthouse"],
            ["passkey", "--lengths", "128"], ["passkey", "--lengths", "128,256", "--depths", "50"],
            ["loss", "--batches", "1", "--phase", "dense", "model.attention_backend=math"]]
    paths = []
    for command, *options in runs:
        argv = [command, str(tiny_run), "--out", str(tmp_path), *options]
        assert main(argv) == 0
        paths.append(output_path(argv))
    assert [p.name for p in paths[:4]] == ["loss-dense-batches1x1.json", "loss-lighthouse-batches1x1.json",
                                           "passkey-128.json", "passkey-128_256-depths50.json"]
    assert paths[4].name.startswith("loss-dense-batches1x1-cfg") and len(set(paths)) == 5
    assert all(p.is_file() and p.with_suffix(".png").is_file() for p in paths)
    losses = {p.name: json.loads(p.read_text())["loss"] for p in paths if p.name.startswith("loss")}
    assert losses["loss-dense-batches1x1.json"] != losses["loss-lighthouse-batches1x1.json"]

    index = json.loads((tmp_path / "index.json").read_text())["outputs"]
    assert [e["json"] for e in index] == [str(p.relative_to(tmp_path)) for p in paths]
    assert index[1]["kind"] == "loss" and index[1]["eval_phase"] == "lighthouse" and index[1]["step"] == 2
    assert index[1]["result"]["loss"] == losses["loss-lighthouse-batches1x1.json"]
    assert index[2]["result"]["mean_accuracy"] == json.loads(paths[2].read_text())["mean"]
    # The same evaluation again replaces its own files and its index entry.
    assert main(["loss", str(tiny_run), "--out", str(tmp_path), "--batches", "1"]) == 0
    index = json.loads((tmp_path / "index.json").read_text())["outputs"]
    assert len(index) == 5 and index[-1]["json"] == "step_00000002/loss-dense-batches1x1.json"


def test_seq_len_is_checked(tiny_run, tmp_path):
    # 128 tokens hold fewer than 128 windows of pooling**(levels-1) = 2 tokens: Lighthouse cannot tile them.
    assert main(["loss", str(tiny_run), "--phase", "lighthouse", "--seq-len", "128", "--out", str(tmp_path)]) == 2


def _cp_worker(rank, world_size, run_dir, prompts, batch, expected_last, expected_losses):
    runner = ModelRunner(run_dir, device="cpu", cp_degree=world_size)
    # Ring attention reorders fp32 sums only.
    torch.testing.assert_close(runner.last_logits(prompts), expected_last, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runner.token_losses(batch), expected_losses, rtol=1e-4, atol=1e-4)
    runner.close()


def test_context_parallel_matches_one_device(tiny_run):
    single = ModelRunner(tiny_run, device="cpu")
    torch.manual_seed(0)
    prompts, batch = torch.randint(0, 256, (2, 128)), torch.randint(0, 256, (2, 257))
    expected_last, expected_losses = single.last_logits(prompts), single.token_losses(batch)
    assert expected_last.shape == (2, 257) and expected_losses.shape == (2, 256)
    spawn_ranks(_cp_worker, 2, tiny_run, prompts, batch, expected_last, expected_losses)


@pytest.mark.parametrize("args, message", [
    (["passkey", "RUN", "--cp", "2"], "--cp 2 needs exactly 2 ranks"),
    (["passkey", "RUN", "--depths", "0,120"], "--depths must be percentages in [0, 100]"),
    (["passkey", "RUN", "--lengths", "50"], "length must be >= "),
    (["passkey", "RUN", "--device", "tpu"], "--device must be one of"),
    (["loss", "RUN", "--phase", "sparse"], "--phase must be one of"),
    (["loss", "RUN", "--spacing", "cubic"], "--spacing must be one of"),
    (["loss", "RUN", "--buckets", "0"], "--buckets must be a positive integer"),
    (["loss", "RUN", "--buckets", "300"], "num_buckets must be in [1, seq_len=256]"),
    (["loss", "RUN", "model.dim=-1"], "model.dim must be a positive integer"),
    (["loss", "RUN", "--seq-len", "0"], "--seq-len must be an integer >= 2, got 0"),
    (["loss", "RUN", "model.n_layers=1"], "do not fit the model with model.n_layers 2 -> 1 (the checkpoint's"),
    (["passkey", "RUN", "model.ffn_hidden=64"], "do not fit the model with model.ffn_hidden "),
    (["loss", "NOWHERE"], "missing does not exist"),
])
def test_bad_arguments_exit_with_a_clear_message(tiny_run, tmp_path, capsys, args, message):
    args = [str(tiny_run) if a == "RUN" else str(tmp_path / "missing") if a == "NOWHERE" else a for a in args]
    assert main(args + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_a_run_trained_on_a_relative_data_path_evaluated_elsewhere_says_where_it_looked(
        tiny_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["path"] = "runs/data/stdlib"  # as a run trained from the repository's root records it
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    assert main(["passkey", str(run), "--lengths", "256", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"the training data runs/data/stdlib of {run}/checkpoints/step_00000002 is not found (a relative path, read "
        f"from {tmp_path}), and with it the record of the model's tokenizer: run lh-eval where the run was "
        f"trained, or pass --tokenizer")
    assert main(["loss", str(run), "--out", str(tmp_path / "out")]) == 2
    assert (f"dataset info not found: runs/data/stdlib/lh_data.json (a relative path, read from {tmp_path}); "
            f"write datasets with lh-data") in capsys.readouterr().err
