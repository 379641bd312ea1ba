"""benchmarks/reproduce.py end to end on a tiny mixture config: the code corpus and the retrieval set, two seeds
of a dense and of a Lighthouse-then-dense arm (real lh-data, lh-train and lh-eval processes), then the report over
seeds, whose numbers are recomputed here from the runs' files. Also: the first recipe's report still builds
from its committed runs (recorded without a seed)."""

import contextlib
import importlib.util
import io
import json
import math
import statistics
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
    "data": {"seq_len": 1024, "micro_batch": 1},  # sources: set by the test (tmp paths)
    "optim": {"lr": 3.0e-3},
    "schedule": {"steps": 8, "warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1, "lighthouse_steps": 0},
    "checkpoint": {"interval": 1000, "keep": 1},
    "logging": {"log_interval": 2, "eval_interval": 2, "eval_batches": 1},
}
# Student's t 0.975-quantile with 1 degree of freedom (two paired seeds): tan(0.475 pi), from its closed-form cdf.
T_975_DF1 = math.tan(0.475 * math.pi)


def _script(*args, expect: int | str = 0):
    """The script's main in this process (the commands it runs, lh-data, lh-train and lh-eval, are processes of
    their own, whose output it prints); what it printed. `expect`: its exit status, or words of its error."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            code = reproduce.main([str(a) for a in args])
        except SystemExit as stop:  # a command failed, or the arguments
            code = stop.code
    ok = code == expect if isinstance(expect, int) else expect in str(code)
    assert ok, printed.getvalue()[-5000:] + f"\n{code}"
    return printed.getvalue()


def _corpus(tree: Path) -> None:
    """12 packages, one document per directory of 3,000 to 5,200 tokens (every one fits a validation split of
    8,000 to 16,000 tokens, so the split exists whatever the hashes)."""
    for i in range(12):
        (tree / f"pkg{i}").mkdir(parents=True)
        for j in range(2):
            (tree / f"pkg{i}" / f"m{j}.py").write_text("".join(f"value_{i}_{j}_{n} = {n * n}\n" for n in range(
                100 + 10 * i)))


def test_reproduce_two_seeds_per_arm_and_report(tmp_path, monkeypatch):
    # One thread per process, as the other tests' processes: torch's threads spin-wait for a busy core.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data, retrieval, results = tmp_path / "code", tmp_path / "retrieval", tmp_path / "results"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY | {"data": TINY["data"] | {"sources": [
        {"path": str(data), "weight": 0.5, "name": "code"}, {"path": str(retrieval), "weight": 0.5,
                                                              "name": "retrieval"}]}}))
    _corpus(tmp_path / "src")
    # Retrieval documents of seq_len tokens: 4 statements and 2 keys queried 4 times each (the defaults: queries
    # restate their statements; about 360 tokens) in 1,024; 8 train
    # documents (the 8 steps draw about 4), 2 held out (one validation batch of 1,025 tokens).
    common = ["--config", config, "--data-roots", tmp_path / "src", "--min-doc-tokens", 2000, "--val-tokens", 8000,
              "--retrieval-train-docs", 8, "--retrieval-val-docs", 2, "--retrieval-keys", 4, "--retrieval-queries", 2]
    # One pass-key length (70 forward passes); retrieval: 2 documents at 2 lengths.
    run = ["--results", results, "--work", tmp_path / "work", "--eval-batches", 1, "--passkey-lengths", "512",
           "--retrieval-docs", 2, "--retrieval-lengths", "512,1024", "--retrieval-weight", 0.3]
    _script("data", *common)
    info = {name: json.loads((path / "lh_data.json").read_text()) for name, path in (("code", data),
                                                                                   ("retrieval", retrieval))}
    settings = info["retrieval"]["retrieval"]
    assert settings["doc_tokens"] == 1024 and settings["filler"] == str(data)
    runs = {("dense", 0): "dense-s0", ("lh50", 0): "lh50-s0", ("dense", 1): "dense-s1", ("lh50", 1): "lh50-s1"}
    for (arm, seed), name in runs.items():
        out = _script("train", name, "--lighthouse-fraction", 0 if arm == "dense" else 0.5, "--seed", seed,
                      *common, *run)
        assert out.count("not rebuilt") == 2  # both sources are reused
    # A complete run is skipped; its name with another seed is refused.
    assert "is complete (run.json), skipped" in _script("train", "dense-s0", "--lighthouse-fraction", 0,
                                                        "--seed", 0, *common, *run)
    _script("train", "dense-s0", "--lighthouse-fraction", 0, "--seed", 3, *common, *run, expect="arm dense seed 0")

    scalars = {}
    for (arm, seed), name in runs.items():
        folder = results / name
        record = json.loads((folder / "run.json").read_text())
        assert (record["arm"], record["seed"], record["retrieval_weight"]) == (arm, seed, 0.3)
        assert record["lighthouse_steps"] == (4 if arm == "lh50" else 0) and record["steps"] == 8
        assert record["data"]["content_sha256"] == info["code"]["content_sha256"]
        assert record["retrieval_data"]["content_sha256"] == info["retrieval"]["content_sha256"]
        trained = yaml.safe_load((folder / "config.yaml").read_text())
        assert trained["seed"] == seed
        assert [(s["name"], s["weight"]) for s in trained["data"]["sources"]] == [("code", 0.7), ("retrieval", 0.3)]
        scalars[name] = json.loads((folder / "scalars.json").read_text())
        assert [s for s, _, _ in scalars[name]["val/retrieval/loss"]] == [2, 4, 6, 8]
        for kind in ("loss", "retrieval", "passkey"):
            assert len(list((folder / f"eval_{kind}").glob("step_*/*.json"))) == 1
        assert not (tmp_path / "work" / name).exists()  # no checkpoints left behind
    # The seed reaches the initial weights: the two dense runs' first losses differ.
    assert scalars["dense-s0"]["train/loss"][0][2] != scalars["dense-s1"]["train/loss"][0][2]

    md = tmp_path / "report" / "reproduction_v2.md"
    _script("report", "--results", results, "--out", md)
    text = md.read_text()
    summary = json.loads((md.parent / "reproduction_summary_v2.json").read_text())
    entries = {(e["arm"], e["seed"]): e for e in summary["runs"]}
    assert set(entries) == set(runs)

    # Every run's entry is its files' numbers: the final validation loss of each source is the mean of its last
    # three evaluations, the retrieval mean is lh-eval retrieval's.
    def final(name, tag):
        return statistics.fmean(v for _, _, v in scalars[name][tag][-3:])

    for key, name in runs.items():
        e = entries[key]
        for source, tag in (("mixture", "val/loss"), ("code", "val/code/loss"), ("retrieval", "val/retrieval/loss")):
            assert e["final_val"][source] == pytest.approx(final(name, tag))
        result = reproduce._eval_json(results / name / "eval_retrieval")
        assert e["retrieval_mean"] == pytest.approx(result["mean"]) and result["lengths"] == [512, 1024]

    # The arm's mean and the paired 95% interval of lh50 minus dense, recomputed from the scalars.
    for source, tag in (("mixture", "val/loss"), ("code", "val/code/loss")):
        dense = [final(f"dense-s{s}", tag) for s in (0, 1)]
        diffs = [final(f"lh50-s{s}", tag) - final(f"dense-s{s}", tag) for s in (0, 1)]
        half = T_975_DF1 * statistics.stdev(diffs) / math.sqrt(2)
        assert summary["arms"]["dense"][f"val_loss/{source}"]["mean"] == pytest.approx(statistics.fmean(dense))
        d = summary["differences"]["lh50"][f"val_loss/{source}"]
        assert d["kind"] == "paired" and d["seeds"] == [0, 1]
        assert (d["diff"], d["lo"], d["hi"]) == pytest.approx((statistics.fmean(diffs), statistics.fmean(diffs) - half,
                                                               statistics.fmean(diffs) + half), rel=1e-6)
        if source == "mixture":
            assert f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" in text
    retrieval = summary["differences"]["lh50"]["retrieval/mean"]
    assert f"The difference in retrieval accuracy (lh50 minus dense) is {retrieval['diff']:+.3f}" in text
    assert "paired seeds (0, 1)" in text
    rises = [reproduce._largest_rise(scalars[name]["val/loss"], 4 if name.startswith("lh") else 0) for name in scalars]
    assert f"is {max(rises):.3f} nats over all 4 runs" in text
    # Around lh50's switch at step 4: its evaluations at steps 4 and 6, and dense's at the same steps.
    for name in runs.values():
        val = {int(step): v for step, _, v in scalars[name]["val/loss"]}
        e = entries[(name.split("-")[0], int(name[-1]))]
        assert e["metrics"]["switch/val jump"] == pytest.approx(val[6] - val[4])
        assert e["metrics"]["switch/val end minus before"] == pytest.approx(val[8] - val[4])
    assert "Steps: lh50-s0: Lighthouse to step 4, evaluations at steps 4 and 6" in text
    for plot in ("val_loss", "position_loss", "retrieval_length"):
        png = f"reproduction_v2_{plot}.png"
        assert png in text and (md.parent / png).stat().st_size > 1000


def test_report_of_one_seed_has_no_interval(tmp_path):
    """The report of a single-seed pair of runs (the committed first-recipe runs, with a seed added to their
    records) says that no interval is available, and the first recipe's own report still builds from them."""
    results = tmp_path / "results"
    for name in ("dense", "lh60"):
        src = ROOT / "benchmarks" / "results" / "reproduction" / name
        dst = results / name
        dst.mkdir(parents=True)
        for f in ("run.json", "scalars.json", "config.yaml"):
            (dst / f).write_text((src / f).read_text())
        for kind in ("eval_loss", "eval_passkey"):
            (dst / kind).mkdir()
            for f in (src / kind).glob("*.json"):
                (dst / kind / f.name).write_text(f.read_text())
    v1 = tmp_path / "v1" / "reproduction.md"
    _script("report", "--results", results, "--out", v1)
    assert "end-to-end reproduction" in v1.read_text() and (v1.parent / "reproduction_summary.json").is_file()
    for name, arm in (("dense", "dense"), ("lh60", "lh60")):
        record = json.loads((results / name / "run.json").read_text())
        (results / name / "run.json").write_text(json.dumps(record | {"seed": 0, "arm": arm}))
    v2 = tmp_path / "v2" / "reproduction_v2.md"
    _script("report", "--results", results, "--out", v2)
    text = v2.read_text()
    summary = json.loads((v2.parent / "reproduction_summary_v2.json").read_text())
    d = summary["differences"]["lh60"]["val_loss/mixture"]
    assert d["lo"] is None and d["kind"] is None
    assert f"{d['diff']:+.4f} (no interval)" in text and "no interval: it needs two seeds in each arm" in text
    assert "Retrieval of lh60 was not measured" in text
