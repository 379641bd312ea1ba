"""`lh-eval retrieval` end to end on a tiny checkpoint that `lh-train` wrote from an `lh-data retrieval`
dataset, and the same accuracy grid under context parallelism (CP=2, gloo) as on one device."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lh_dist.data.cli import main as lh_data
from lh_dist.data.retrieval import dataset_generator
from lh_dist.eval import runner as runner_module
from lh_dist.eval.cli import main, output_path
from lh_dist.eval.outputs import rounded
from lh_dist.eval.retrieval import retrieval_grid
from lh_dist.eval.runner import ModelRunner

from conftest import TINY_MODEL
from spawn import spawn_ranks

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory, stdlib_dataset):
    """(run dir, dataset): two dense steps at seq_len 256 on 256-token retrieval documents."""
    root = tmp_path_factory.mktemp("retrieval")
    data, run_dir = root / "data", root / "run"
    assert lh_data(["retrieval", "--out", str(data), "--filler", str(stdlib_dataset), "--doc-tokens", "256",
                    "--train-docs", "8", "--val-docs", "4", "--keys", "3", "--queries", "2", "--min-gap", "8",
                    "--value-digits", "2"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "lh_dist.train.cli", "--config", str(REPO / "configs/tiny-cpu.yaml"),
           f"data.path={data}", f"logging.run_dir={run_dir}", "parallel.cp_degree=1", *TINY_MODEL,
           "data.seq_len=256", "data.micro_batch=1", "schedule.steps=2", "schedule.warmup_steps=1",
           "schedule.decay=constant", "schedule.lighthouse_steps=0", "checkpoint.interval=2",
           "logging.eval_batches=1", "logging.eval_interval=2"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir, data


def test_cli_writes_json_png_and_index(retrieval_run, tmp_path):
    run_dir, data = retrieval_run
    argv = ["retrieval", str(run_dir), "--lengths", "200,256", "--docs", "3", "--depth-bins", "2",
            "--out", str(tmp_path), "--device", "cpu", "--batch-size", "2"]
    assert main(argv) == 0
    path = tmp_path / "step_00000002" / "retrieval-200_256-docs3-bins2.json"
    assert output_path(argv) == path
    result = json.loads(path.read_text())
    assert result["data"] == str(data) and result["eval_phase"] == "dense" and result["lengths"] == [200, 256]
    assert result["settings"]["keys"] == 3 and result["num_queries"] == 2 * 3 * 2
    accuracy, queries = np.array(result["accuracy"], dtype=float), np.array(result["queries"])
    assert accuracy.shape == queries.shape == (2, 2) and queries.sum() == 12
    assert np.nanmin(accuracy) >= 0 and np.nanmax(accuracy) <= 1
    assert result["depth_edges"] == [0.0, 0.5, 1.0]
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    entry = json.loads((tmp_path / "index.json").read_text())["outputs"][-1]
    assert entry["kind"] == "retrieval" and entry["result"] == {"mean_accuracy": result["mean"]}


def test_default_lengths_are_those_that_hold_a_document(retrieval_run, tmp_path, capsys):
    run_dir, data = retrieval_run
    # 256 x {1/3, 2/3, 1}: 3 statements (26 tokens), 2 queries (34) and a gap of 8 need 154 tokens.
    assert output_path(["retrieval", str(run_dir), "--out", str(tmp_path)]).name == "retrieval-170_256.json"
    # The evaluation says which of 256 x {1/24, 1/12, 1/6, 1/3, 2/3, 1} it left out, and why.
    assert main(["retrieval", str(run_dir), "--docs", "1", "--depth-bins", "1", "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    assert (f"lh-eval retrieval: default lengths 10, 20, 42, 84 left out: shorter than a retrieval document of "
            f"{data} needs (154 tokens)") in capsys.readouterr().err.splitlines()


def test_cli_scores_a_model_that_copies_the_value_as_one(retrieval_run, tmp_path, monkeypatch):
    run_dir, data = retrieval_run
    generator = dataset_generator(data)
    answers = {}  # (length, tokens' bytes) -> {position predicting a value token: that token}
    for length in (170, 256):
        for i in range(4):
            document = generator.document(i, length)
            answers[document.tokens.tobytes()] = {q.answer_start + k - 1: t for q in document.queries
                                                  for k, t in enumerate(q.answer)}
    generator.close()

    def copying(self, tokens, positions):
        table = [answers[row.numpy().tobytes()] for row in tokens]
        return torch.tensor([[t.get(int(p), -1) for p in positions] for t in table])

    monkeypatch.setattr(runner_module.ModelRunner, "next_token_argmax", copying)
    assert main(["retrieval", str(run_dir), "--docs", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "step_00000002" / "retrieval-170_256-docs4.json").read_text())
    assert result["mean"] == 1.0 and result["num_queries"] == 16


def test_next_token_argmax_is_the_argmax_of_the_logits(retrieval_run):
    runner = ModelRunner(retrieval_run[0], device="cpu")
    tokens = torch.randint(0, 256, (2, 64))
    positions = torch.tensor([0, 5, 6, 40, 63])
    expected = runner._forward(tokens).argmax(dim=-1)[:, positions]  # [2, 5] from the whole [2, 64, V]
    assert torch.equal(runner.next_token_argmax(tokens, positions), expected)


class _Documents:
    """A generator's documents built beforehand, so that the ranks need not open the filler."""

    def __init__(self, generator, lengths, num_docs):
        self.settings = generator.settings
        self.documents = {(i, n): generator.document(i, n) for n in lengths for i in range(num_docs)}

    def document(self, index, length):
        return self.documents[index, length]

    def answer_with(self, argmax_fn):
        """Make every other query's answer what argmax_fn predicts, so that about half are right."""
        for key, document in self.documents.items():
            queries = list(document.queries)
            for j in range(0, len(queries), 2):
                q = queries[j]
                positions = torch.arange(q.answer_start - 1, q.answer_start - 1 + len(q.answer))
                predicted = argmax_fn(torch.from_numpy(document.tokens)[None], positions)[0]
                queries[j] = dataclasses.replace(q, answer=tuple(predicted.tolist()))
            self.documents[key] = dataclasses.replace(document, queries=queries)


def _cp_worker(rank, world_size, run_dir, documents, expected_grid, tokens, positions, expected_argmax):
    runner = ModelRunner(run_dir, device="cpu", cp_degree=world_size)
    assert torch.equal(runner.next_token_argmax(tokens, positions), expected_argmax)
    grid = retrieval_grid(runner.next_token_argmax, documents, [160, 256], num_docs=4, batch_size=2, log=None)
    runner.close()
    assert rounded(grid) == rounded(expected_grid)  # empty cells are NaN, which equals nothing


def test_context_parallel_grid_equals_one_device(retrieval_run):
    run_dir, data = retrieval_run
    generator = dataset_generator(data)
    documents = _Documents(generator, [160, 256], 4)
    generator.close()
    single = ModelRunner(run_dir, device="cpu")
    documents.answer_with(single.next_token_argmax)
    expected = retrieval_grid(single.next_token_argmax, documents, [160, 256], num_docs=4, batch_size=2, log=None)
    assert 0.4 < expected["mean"] < 0.6  # right where the answers are the model's predictions
    # Positions in every zigzag chunk of both ranks (chunks of 32: rank 0 holds 0 and 3, rank 1 holds 1 and 2).
    tokens, positions = torch.randint(0, 256, (2, 128)), torch.tensor([0, 31, 32, 64, 95, 96, 127])
    expected_argmax = single.next_token_argmax(tokens, positions)
    # Ring attention reorders fp32 sums only; an argmax could flip on a near-tie, which random
    # weights make vanishingly unlikely at 257 logits.
    spawn_ranks(_cp_worker, 2, run_dir, documents, expected, tokens, positions, expected_argmax)


@pytest.mark.parametrize("args, message", [
    (["--docs", "0"], "--docs must be a positive integer"),
    (["--data", "STDLIB"], "was not written by lh-data retrieval"),
    (["--lengths", "100"], "a document of 100 tokens cannot hold 3 statements"),
])
def test_bad_arguments_exit_with_one_line(retrieval_run, stdlib_dataset, tmp_path, capsys, args, message):
    args = [str(stdlib_dataset) if a == "STDLIB" else a for a in args]
    assert main(["retrieval", str(retrieval_run[0]), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("lh-eval retrieval: error: ")
