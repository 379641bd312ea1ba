"""benchmarks/reproduce.py's statistics over seeds: Student's t quantile, the paired / Welch / absent interval
of a difference between arms, the retrieval sentence; and the recipe v2 config loads as a two-source mixture."""

import importlib.util
import math
import statistics
from pathlib import Path

import pytest

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
    assert "says little" in verdict(-0.05, 0.15, dense=0.01)
    none = reproduce.retrieval_verdict("lh60", {"diff": 0.1, "lo": None, "hi": None}, 0.5, "none")
    assert "no interval" in none and "not decided" in none


def test_recipe_v2_config_is_the_code_and_retrieval_mixture():
    cfg = load_config(ROOT / "configs" / "repro-64k-v2.yaml")
    assert [s.name for s in cfg.data.sources] == [reproduce.CODE, reproduce.RETRIEVAL]
    assert cfg.schedule.decay == "cosine" and cfg.schedule.min_lr_ratio == 0.1 and cfg.optim.lr == 6e-4
    # 16 validation samples in all, as the evidence report needs at least.
    assert cfg.logging.eval_batches * len(cfg.data.sources) == 16
