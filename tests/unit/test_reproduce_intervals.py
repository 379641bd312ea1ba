"""benchmarks/reproduce.py's statistics over seeds: Student's t quantile, the paired / Welch / absent interval
of a difference between arms, the sentences on retrieval, loss and far context; the losses around the switch and
the gain from far context of one run; and the recipe v2 config loads as a two-source mixture."""

import importlib.util
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from lh_dist.config import load_config

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)


@pytest.mark.parametrize("df", [1, 2])
def test_t_quantile_matches_closed_forms(df):
    # Closed-form cdfs: df 1 is Cauchy, F(t) = 1/2 + atan(t)/pi; df 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    a = 2 * 0.975 - 1
    exact = math.tan(math.pi * a / 2) if df == 1 else a * math.sqrt(2 / (1 - a * a))
    # Simpson's rule with 4,000 intervals on a smooth density and 50 bisection halvings of [0, 64]: far below 1e-6.
    assert reproduce.t_quantile(0.975, df) == pytest.approx(exact, rel=1e-6)


def test_difference_pairs_by_seed_then_falls_back_to_welch_then_to_none():
    dense, lh = {0: 1.0, 1: 2.0, 2: 1.5}, {0: 1.2, 1: 2.1, 2: 1.9}
    d = reproduce.difference(dense, lh)
    diffs = [0.2, 0.1, 0.4]
    half = reproduce.t_quantile(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert d["kind"] == "paired" and d["seeds"] == [0, 1, 2] and d["df"] == 2
    assert (d["diff"], d["lo"], d["hi"]) == pytest.approx((statistics.fmean(diffs), statistics.fmean(diffs) - half,
                                                           statistics.fmean(diffs) + half))
    # No seed in common: Welch. With equal counts and variances its df is 2n - 2 and its se sqrt(2 s^2 / n).
    w = reproduce.difference({0: 1.0, 1: 2.0}, {5: 3.0, 6: 4.0})
    half = reproduce.t_quantile(0.975, 2) * math.sqrt(2 * 0.5 / 2)
    assert w["kind"] == "welch" and w["df"] == pytest.approx(2)
    assert (w["diff"], w["lo"], w["hi"]) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    one = reproduce.difference({0: 1.0}, {0: 1.5})
    assert one["diff"] == pytest.approx(0.5) and one["lo"] is None and one["kind"] is None


def test_retrieval_sentence_follows_the_interval():
    def verdict(lo, hi, dense=0.5):
        return reproduce.retrieval_verdict("lh60", {"diff": (lo + hi) / 2, "lo": lo, "hi": hi}, dense, "paired")

    assert "does not survive intact" in verdict(-0.3, -0.1) and "loses 0.100 to 0.300" in verdict(-0.3, -0.1)
    assert "retrieves better than dense" in verdict(0.1, 0.2)
    assert "a loss of more than 0.050 is excluded" in verdict(-0.05, 0.15)
    untrained = verdict(-0.05, 0.15, dense=0.01)
    assert "not decided" in untrained and "survives within" not in untrained and "[-0.050, +0.150]" in untrained
    none = reproduce.retrieval_verdict("lh60", {"diff": 0.1, "lo": None, "hi": None}, 0.5, "none")
    assert "no interval" in none and "not decided" in none


def test_loss_and_far_context_sentences_follow_the_interval():
    def loss(lo, hi):
        return reproduce.loss_verdict("lh60", {"diff": (lo + hi) / 2, "lo": lo, "hi": hi}, "paired", 0.8)

    assert "ends worse than dense" in loss(0.05, 0.2) and "+0.1250 [+0.0500, +0.2000]" in loss(0.05, 0.2)
    assert "ends better than dense" in loss(-0.2, -0.05)
    assert "level with dense" in loss(-0.05, 0.1) and "0.80 of dense's wall-clock" in loss(-0.05, 0.1)
    one = reproduce.loss_verdict("lh60", {"diff": 0.18, "lo": None, "hi": None}, "no interval: one seed", 0.8)
    assert "+0.1800 (no interval: one seed): lh60 ends above dense" in one

    def far(lo, hi):
        return reproduce.context_verdict("lh60", {"diff": (lo + hi) / 2, "lo": lo, "hi": hi}, "paired")

    assert "gains less from far context" in far(0.01, 0.03)
    assert "gains more from far context" in far(-0.03, -0.01)
    assert "a deficit of more than 0.0200 nats is excluded" in far(-0.01, 0.02)
    single = reproduce.context_verdict("lh60", {"diff": -0.0168, "lo": None, "hi": None}, "none")
    assert "differs by -0.0168, with no interval" in single and "not decided" in single
    assert reproduce.context_verdict("lh60", None, "none") is None


def _run(val, train, buckets):
    """A run record as load_run gives it, with only what run_metrics reads."""
    return {"name": "r", "lighthouse_steps": 0, "scalars": {"val/loss": val, "train/loss": train},
            "loss_eval": {"buckets": buckets}, "retrieval_eval": None, "passkey_eval": {"mean": 0.1},
            "wall_s": {"train": 120.0}}


def test_switch_losses_and_far_context_gain_of_one_run():
    val = [[50 * i, 0.0, v] for i, v in enumerate([3.0, 2.0, 1.5, 2.4, 1.9, 1.6], start=1)]  # steps 50-300
    train = [[10 * i, 0.0, 2.0 if i <= 15 else 3.0] for i in range(1, 31)]  # steps 10-300, a jump after 150
    buckets = [{"start": 0, "end": 512, "loss": 1.8}, {"start": 512, "end": 1024, "loss": 1.7},
               {"start": 1024, "end": 2048, "loss": 1.65}]
    m = reproduce.run_metrics(_run(val, train, buckets), switch_step=150)
    # Evaluations at 150 (the last of the Lighthouse phase) and 200; the last evaluation, 1.6, at 300.
    assert m["switch/val before"] == 1.5 and m["switch/val after"] == 2.4
    assert m["switch/val jump"] == pytest.approx(0.9) and m["switch/val end minus before"] == pytest.approx(0.1)
    # Five logged training losses on each side: 2.0 up to step 150, 3.0 after it.
    assert m["switch/train jump"] == pytest.approx(1.0)
    assert m["context_gain/last bucket minus first"] == pytest.approx(-0.15)
    # A switch after the last evaluation has no "after": no switch numbers; without a switch step, none either.
    assert not any(k.startswith("switch/") for k in reproduce.run_metrics(_run(val, train, buckets), switch_step=300))
    assert not any(k.startswith("switch/") for k in reproduce.run_metrics(_run(val, train, buckets)))


@pytest.mark.parametrize("change, refusal", [
    (None, None),
    (("schedule", "decay_steps", 400), "differ in schedule.decay_steps (None and 400)"),
    (("optim", "lr", 1e-3), "differ in optim.lr (0.0006 and 0.001)"),
])
def test_a_report_compares_runs_that_differ_only_in_seed_and_switch(tmp_path, change, refusal):
    # Two committed dense runs of recipe v2; the second's config changed in one setting, or in none but its data's
    # and run's paths.
    for name in ("dense-s0", "dense-s1"):
        shutil.copytree(ROOT / "benchmarks" / "results" / "reproduction_v2" / name, tmp_path / "results" / name)
    config = tmp_path / "results" / "dense-s1" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["logging"]["run_dir"] = "/elsewhere/dense-s1"
    cfg["data"]["sources"] = [dict(s, path=f"/elsewhere/{s['name']}") for s in cfg["data"]["sources"]]
    if change:
        section, field, value = change
        cfg[section][field] = value
    config.write_text(yaml.safe_dump(cfg))
    args = ["report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "report" / "r_v2.md")]
    if refusal is None:
        assert reproduce.main(args) == 0 and (tmp_path / "report" / "r_v2.md").is_file()
        return
    with pytest.raises(SystemExit) as stop:
        reproduce.main(args)
    assert "runs dense-s0 and dense-s1 " + refusal in str(stop.value)


def test_recipe_v2_config_is_the_code_and_retrieval_mixture():
    cfg = load_config(ROOT / "configs" / "repro-64k-v2.yaml")
    assert [s.name for s in cfg.data.sources] == [reproduce.CODE, reproduce.RETRIEVAL]
    assert cfg.schedule.decay == "cosine" and cfg.schedule.min_lr_ratio == 0.1 and cfg.optim.lr == 6e-4
    # 16 validation samples in all, as the evidence report needs at least.
    assert cfg.logging.eval_batches * len(cfg.data.sources) == 16
