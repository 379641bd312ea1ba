"""The learning rate of each step: linear warmup, then the decay over every later step, or, with
schedule.decay_steps, held at the peak until the decay's last steps (warmup-stable-decay)."""

import math

import pytest

from lh_dist.config import load_config
from lh_dist.train.loop import lr_at


def _cfg(*overrides):
    return load_config("configs/tiny-cpu.yaml", ["schedule.steps=10", "schedule.warmup_steps=2",
                                                 "schedule.lighthouse_steps=0", "optim.lr=0.5",
                                                 "schedule.min_lr_ratio=0.1", *overrides])


def test_warmup_then_cosine_over_every_later_step():
    cfg = _cfg()
    lrs = [lr_at(cfg, step) for step in range(10)]
    assert lrs[:2] == pytest.approx([0.25, 0.5])  # warmup: (step + 1) / warmup_steps of the peak
    # Steps 2..9 run the cosine from the peak to the floor (0.05): frac = (step - 2) / 7.
    expected = [0.05 + 0.45 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 7)) for step in range(2, 10)]
    assert lrs[2:] == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.05)


@pytest.mark.parametrize("decay, ends", [("cosine", [0.5, 0.3875, 0.1625, 0.05]),
                                         ("linear", [0.5, 0.35, 0.2, 0.05])])
def test_decay_steps_hold_the_peak_until_the_decay(decay, ends):
    cfg = _cfg(f"schedule.decay={decay}", "schedule.decay_steps=4")
    lrs = [lr_at(cfg, step) for step in range(10)]
    assert lrs[:6] == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert lrs[6:] == pytest.approx(ends)  # the last 4 steps, from the peak to the floor


def test_decay_steps_at_their_bounds():
    unset = [lr_at(_cfg(), step) for step in range(10)]
    assert [lr_at(_cfg("schedule.decay_steps=8"), step) for step in range(10)] == pytest.approx(unset)
    assert [lr_at(_cfg("schedule.decay_steps=0"), step) for step in range(2, 10)] == pytest.approx([0.5] * 8)
