"""The console: interval means, the progress line with elapsed time and ETA, the run summary."""

import math

import pytest

from lh_dist.train.metrics import Metrics, StepMeans, progress_line, run_summary

VALUES = {"train/loss": 4.12345, "train/grad_norm": 0.8421, "train/lr": 3e-3, "perf/tokens_per_s": 3612.4}


def test_interval_means_weight_throughput_by_time_and_skip_nonfinite_losses():
    means = StepMeans()
    means.add(loss=4.0, grad_norm=1.0, lr=1e-3, tokens=1000, seconds=1.0)
    means.add(loss=math.nan, grad_norm=math.nan, lr=2e-3, tokens=1000, seconds=0.5, finite=False)
    means.add(loss=2.0, grad_norm=3.0, lr=3e-3, tokens=1000, seconds=1.5)
    out = means.take()
    assert out == {"loss": 3.0, "grad_norm": 2.0, "lr": 3e-3, "tokens_per_s": 1000.0, "step_time_s": 1.0, "steps": 3}
    assert means.take() is None  # started over


def test_progress_line():
    line = progress_line(20, 60, VALUES, "lighthouse", elapsed=41.2, eta=82.4)
    assert line == ("step     20/60  loss 4.1235  grad 0.842  lr 3.00e-03  3,612 tok/s  lighthouse  "
                    "elapsed 0:00:41  eta 0:01:22")
    # Three significant digits, trailing zeros kept: a norm of exactly 4 reads "4.00", not "4".
    assert "  grad 4.00  " in progress_line(20, 60, VALUES | {"train/grad_norm": 4.0}, "dense", 0, 0)
    with_memory = progress_line(20, 60, VALUES | {"perf/peak_memory_gib": 12.345}, "dense", 0, 0)
    assert "  3,612 tok/s  mem 12.3 GiB  dense  " in with_memory


@pytest.mark.parametrize("start", [0, 100])  # a fresh run, and one resumed at step 100
def test_eta_is_right_from_the_first_line(tmp_path, start):
    now = [1000.0]
    metrics = Metrics(tmp_path, rank=1, total_steps=start + 50, clock=lambda: now[0])
    metrics.start(start, {})
    now[0] += 20.0  # 10 steps of 2 s
    assert metrics.elapsed == 20.0 and metrics.eta(start + 10) == pytest.approx(80.0)


def test_summary_paragraph():
    text = run_summary(status="complete", step=60, total_steps=60, start_step=30, seconds=125.0, tokens_per_step=2048,
                       lighthouse_steps=40, train_loss=(51, 60, 2.91234), val_loss=(60, 2.95), checkpoint="ck/step_60")
    assert text == ("lh_dist: run complete at step 60/60 after 0:02:05 (resumed at step 30). This process trained "
                    "30 steps (10 Lighthouse, 20 dense) on 61,440 tokens, 492 tokens/s overall; 122,880 tokens in "
                    "total. Final train loss 2.9123 (mean of steps 51-60), validation loss 2.9500 (step 60). "
                    "Newest checkpoint: ck/step_60.")
    stopped = run_summary(status="stopped by SIGTERM", step=3, total_steps=10, start_step=0, seconds=1,
                          tokens_per_step=1, lighthouse_steps=0, train_loss=(3, 3, 5.0), val_loss=None, checkpoint=None)
    assert "(step 3); no validation in this process. No checkpoint was written." in stopped
