"""benchmarks/reproduce.py end to end on a tiny config: data, a dense and a Lighthouse-then-dense run
(real lh-train and lh-eval processes), then the report, whose numbers are checked against the runs."""

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "reproduce.py"
_spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)

TINY = {
    "model": {"dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 128, "vocab_size": 257},
    "lighthouse": {"levels": 2, "pooling": 2, "topk": 512, "dense_layers": [0]},
    "data": {"seq_len": 1024, "micro_batch": 1},
    "optim": {"lr": 3.0e-3},
    "schedule": {"steps": 12, "warmup_steps": 2, "decay": "constant", "lighthouse_steps": 0},
    "checkpoint": {"interval": 1000, "keep": 1},
    "logging": {"log_interval": 2, "eval_interval": 2, "eval_batches": 1},
}


def _script(*args):
    """The script's main in this process (the commands it runs, lh-data, lh-train and lh-eval, are processes of
    their own, whose output it prints); what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            code = reproduce.main([str(a) for a in args])
        except SystemExit as stop:  # a command failed, or the arguments
            code = stop.code
    assert code == 0, printed.getvalue()[-5000:] + f"\n{code}"
    return printed.getvalue()


def test_reproduce_two_runs_and_report(tmp_path, monkeypatch):
    # One thread per process, as the other tests' processes: torch's threads spin-wait for a busy core.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    data, results = tmp_path / "data", tmp_path / "results"
    # The corpus: a source tree of 12 packages, one document per directory of 3,000 to 5,200 tokens
    # (every one fits a validation split of 8,000 to 16,000 tokens, so the split exists whatever the hashes).
    tree = tmp_path / "src"
    for i in range(12):
        (tree / f"pkg{i}").mkdir(parents=True)
        for j in range(2):
            (tree / f"pkg{i}" / f"m{j}.py").write_text("".join(f"value_{i}_{j}_{n} = {n * n}\n" for n in range(
                100 + 10 * i)))
    (tree / "pkg0" / "short.txt").write_text("not included")
    common = ["--config", config, "--data", data, "--data-roots", tree, "--min-doc-tokens", 2000,
              "--val-tokens", 8000]
    # One pass-key length: 70 forward passes of one prompt (lh-eval's test covers several lengths).
    run = ["--results", results, "--work", tmp_path / "work", "--eval-batches", 1, "--passkey-lengths", "512"]
    _script("train", "dense", "--lighthouse-fraction", 0, *common, *run)
    out = _script("train", "lh50", "--lighthouse-fraction", 0.5, *common, *run)
    assert "not rebuilt" in out  # the second run reuses the corpus

    info = json.loads((data / "lh_data.json").read_text())
    assert info["splits"]["val"]["tokens"] >= 8000 and info["min_doc_tokens"] == 2000

    for name, k in (("dense", 0), ("lh50", 6)):
        folder = results / name
        record = json.loads((folder / "run.json").read_text())
        assert record["lighthouse_steps"] == k and record["steps"] == 12
        assert record["data"]["content_sha256"] == info["content_sha256"]
        scalars = json.loads((folder / "scalars.json").read_text())
        assert [s for s, _, _ in scalars["val/loss"]] == list(range(2, 13, 2))
        assert len(list((folder / "eval_loss").glob("step_*/*.json"))) == 1
        assert len(list((folder / "eval_passkey").glob("step_*/*.json"))) == 1
        assert not (tmp_path / "work" / name).exists()  # no checkpoints left behind

    md = tmp_path / "report" / "reproduction.md"
    _script("report", "--results", results, "--out", md)
    text = md.read_text()
    for plot in ("val_loss", "train_loss_switch", "position_loss", "passkey"):
        assert (md.parent / f"reproduction_{plot}.png").stat().st_size > 1000
        assert f"reproduction_{plot}.png" in text
    summary = {s["name"]: s for s in json.loads((md.parent / "reproduction_summary.json").read_text())}

    # The report's numbers are those of the runs: the mean of the last three evaluations, and so on.
    def val(name):
        return json.loads((results / name / "scalars.json").read_text())["val/loss"]

    dense, lh = val("dense"), val("lh50")
    final = {n: sum(v for _, _, v in series[-3:]) / 3 for n, series in (("dense", dense), ("lh50", lh))}
    assert summary["dense"]["final_val"] == pytest.approx(final["dense"])
    assert summary["lh50"]["final_val_diff"] == pytest.approx(final["lh50"] - final["dense"])
    assert summary["lh50"]["switch_spike"] == pytest.approx(lh[3][2] - lh[2][2])  # evals at steps 8 and 6
    assert f"{final['lh50']:.4f}" in text and f"{final['lh50'] - final['dense']:+.4f}" in text
    assert summary["lh50"]["tokens_per_s"]["lighthouse"] > 0 and summary["lh50"]["tokens_per_s"]["dense"] > 0
    assert summary["dense"]["tokens_per_s"]["lighthouse"] is None
