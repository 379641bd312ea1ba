"""`lh-export`, `lh-eval` and `lh-train --init-from` on a run directory whose newest checkpoint is
damaged: they use the one before and say which they passed over and why, one line each, as
`lh-train --resume auto` does (one function picks the checkpoint for all). Also their other one-line
messages: an --out that is a file, and the default pass-key lengths left out. The checkpoints are
written by hand; the commands run in this process."""

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL
from lh_dist.checkpoint.format import FORMAT_VERSION, MANIFEST, file_crc32
from lh_dist.config import load_config, save_config

WEIGHTS = "mp_rank_00_model_states.pt"


def write_checkpoint(run: Path, cfg, step: int) -> None:
    """A complete checkpoint of fresh weights at `step`, as the trainer leaves it."""
    from lh_dist.model import Transformer
    from lh_dist.ops.attention import attention

    folder = run / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    dense = lambda q, k, v: attention(q, k, v, causal=True, backend="math")  # noqa: E731
    model = Transformer(cfg.model, [dense] * cfg.model.n_layers)
    torch.save({"module": model.state_dict()}, folder / WEIGHTS)
    torch.save({"step": step, "phase": "dense"}, folder / "trainer_rank_00000.pt")
    files = {f.name: {"bytes": f.stat().st_size, "crc32": file_crc32(f)} for f in folder.iterdir()}
    (folder / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "id": f"id{step}", "step": step,
                                               "phase": "dense", "files": files, "config": cfg.to_dict()}))


@pytest.fixture
def run_dir(tmp_path, stdlib_dataset):
    """A run dir with checkpoints at steps 5 and 7, step 7's weights truncated to 100 bytes."""
    cfg = load_config(None, [f"data.path={stdlib_dataset}", f"logging.run_dir={tmp_path / 'run'}", *TINY_MODEL,
                             "data.seq_len=256", "schedule.lighthouse_steps=0", "parallel.cp_degree=1"])
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    for step in (5, 7):
        write_checkpoint(run, cfg, step)
    weights = run / "checkpoints" / "step_00000007" / WEIGHTS
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])
    return run, f"skipped checkpoint step_00000007: {WEIGHTS} has 100 bytes, the manifest says {size}"


def test_export_says_which_checkpoint_it_passed_over(run_dir, tmp_path, capsys):
    from lh_dist.hf.export import main

    run, skipped = run_dir
    assert main([str(run), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().err.splitlines() == [f"lh-export: {skipped}"]
    assert "# run, step 5\n" in (tmp_path / "hf" / "README.md").read_text()


def test_export_to_a_file_is_one_line(run_dir, tmp_path, capsys):
    from lh_dist.hf.export import main

    run, _ = run_dir
    (tmp_path / "file").write_text("x")
    for out, message in [(tmp_path / "file", f"--out {tmp_path / 'file'} is a file; lh-export writes a folder "
                                             f"(created if missing)"),
                         (tmp_path / "file" / "hf", f"--out {tmp_path / 'file' / 'hf'} cannot be created: "
                                                    f"{tmp_path / 'file'} is a file")]:
        assert main([str(run / "checkpoints" / "step_00000005"), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"lh-export: error: {message}\n"
    assert (tmp_path / "file").read_text() == "x"


def test_export_replaces_an_earlier_export_and_no_other_model(run_dir, tmp_path, capsys):
    from lh_dist.hf.export import main

    run, _ = run_dir
    assert main([str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main([str(run), "--out", str(tmp_path / "hf")]) == 0  # an export over an export
    other = tmp_path / "model"
    other.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
        (other / name).write_text("x")
    capsys.readouterr()
    assert main([str(run), "--out", str(other)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lh-export: error: --out {other} holds a model that lh-export did not write "
        f"(model-00001-of-00002.safetensors, model-00002-of-00002.safetensors): choose a new or empty folder")
    assert sorted(p.read_text() for p in other.iterdir()) == ["x"] * 3  # untouched


def test_eval_says_which_checkpoint_and_which_default_lengths_it_passed_over(run_dir, tmp_path, capsys):
    from lh_dist.data.tokenizer import load_tokenizer
    from lh_dist.eval.cli import main
    from lh_dist.eval.passkey import min_prompt_length

    run, skipped = run_dir
    assert main(["passkey", str(run), "--depths", "50", "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    shortest = min_prompt_length(load_tokenizer("byte"))
    assert 84 < shortest <= 170  # 256 x {1/24, 1/12, 1/6, 1/3} (rounded down to even) are too short
    assert capsys.readouterr().err.splitlines() == [
        f"lh-eval passkey: {skipped}",
        f"lh-eval passkey: default lengths 10, 20, 42, 84 left out: shorter than a pass-key prompt without filler "
        f"({shortest} tokens of tokenizer byte)"]
    result = json.loads((tmp_path / "eval" / "step_00000005" / "passkey-170_256-depths50.json").read_text())
    assert result["step"] == 5 and result["lengths"] == [170, 256]


def test_init_from_keeps_the_lines_for_the_trainer_to_print(run_dir):
    from lh_dist.train.init_from import open_init_source

    run, skipped = run_dir
    source = open_init_source(str(run), load_config(run / "config.yaml"))
    assert source.folder == run / "checkpoints" / "step_00000005" and source.notes == [skipped]
