"""Pass-key prompts and scoring, with test doubles in place of a model."""

import numpy as np
import pytest
import torch

from lh_dist.data.tokenizer import ByteTokenizer
from lh_dist.eval.passkey import (PAPER_DEPTHS, QUESTION, build_prompt, default_lengths, digit_token_ids,
                                  min_prompt_length, needle_offset, passkey_grid)

TOK = ByteTokenizer()
DIGIT_IDS = digit_token_ids(TOK)


def _digit_positions(prompt: torch.Tensor) -> list[int]:
    return [i for i, t in enumerate(prompt.tolist()) if t in DIGIT_IDS]


@pytest.mark.parametrize("length", [min_prompt_length(TOK), 257, 1000])
@pytest.mark.parametrize("depth", PAPER_DEPTHS)
def test_prompt_length_needle_depth_and_question(length, depth):
    prompt = build_prompt(TOK, length, depth, digit=7, seed=3)
    assert prompt.shape == (length,) and prompt.dtype == torch.long
    assert prompt[0] == TOK.eod_id
    text = TOK.decode(prompt)
    assert text.endswith(QUESTION)
    # The needle's two copies of the digit are the only digits in the prompt.
    positions = _digit_positions(prompt)
    assert len(positions) == 2 and all(prompt[p] == DIGIT_IDS[7] for p in positions)
    needle_start = text.index(" The pass key is 7. Remember it. 7 is the pass key. ")
    num_filler = length - min_prompt_length(TOK)
    assert needle_start == needle_offset(num_filler, depth)  # +1 for eod, -1 since decode drops it
    assert positions[0] == 1 + needle_offset(num_filler, depth) + len(" The pass key is ")


def test_depth_extremes_put_the_needle_at_the_ends():
    first = TOK.decode(build_prompt(TOK, 400, 0, digit=3))
    last = TOK.decode(build_prompt(TOK, 400, 100, digit=3))
    assert first.startswith(" The pass key is 3.")
    assert last.endswith(" 3 is the pass key. " + QUESTION)


def test_prompts_differ_only_in_the_digit_and_depend_on_seed():
    a, b = build_prompt(TOK, 500, 30, digit=1), build_prompt(TOK, 500, 30, digit=2)
    assert (a != b).sum() == 2
    assert not torch.equal(build_prompt(TOK, 500, 30, digit=1, seed=1), a)
    assert torch.equal(build_prompt(TOK, 500, 30, digit=1), a)


def test_prompt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="length must be >= "):
        build_prompt(TOK, min_prompt_length(TOK) - 1, 50, 0)
    with pytest.raises(ValueError, match="depth"):
        build_prompt(TOK, 300, 101, 0)
    with pytest.raises(ValueError, match="digit"):
        build_prompt(TOK, 300, 50, 10)


def test_multi_token_digits_are_rejected():
    class TwoBytesPerChar(ByteTokenizer):
        spec = "two-bytes"

        def encode(self, text):
            return np.repeat(super().encode(text), 2)

    with pytest.raises(ValueError, match="one token per digit"):
        digit_token_ids(TwoBytesPerChar())


def test_default_lengths_are_the_papers_at_96k():
    assert default_lengths(98304, TOK) == [4096, 8192, 16384, 32768, 65536, 98304]
    assert default_lengths(512, TOK, multiple=4) == [168, 340, 512]  # 21 and 42 are too short


# ---- scoring with logits-level test doubles --------------------------------------------------

def oracle(prompts: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] that put the needle's digit (read from the prompt) on top."""
    logits = torch.zeros(prompts.shape[0], TOK.vocab_size)
    for b, prompt in enumerate(prompts):
        logits[b, prompt[_digit_positions(prompt)[0]]] = 5.0
    return logits


def fixed_digit(prompts: torch.Tensor) -> torch.Tensor:
    logits = torch.randn(prompts.shape[0], TOK.vocab_size)
    logits[:, DIGIT_IDS[4]] = 100.0
    return logits


def uniform(prompts: torch.Tensor) -> torch.Tensor:
    return torch.zeros(prompts.shape[0], TOK.vocab_size)


@pytest.mark.parametrize("model, expected", [(oracle, 1.0), (fixed_digit, 0.1), (uniform, 0.1)])
def test_scores_of_test_doubles(model, expected):
    lengths, depths = [150, 300], [0, 50, 100]
    grid = passkey_grid(model, TOK, lengths, depths, batch_size=4, log=None)
    assert np.asarray(grid["accuracy"]).shape == (3, 2)
    assert np.allclose(grid["accuracy"], expected)
    assert grid["mean"] == pytest.approx(expected)
    assert np.asarray(grid["predictions"]).shape == (3, 2, 10)
    if model is oracle:
        assert grid["predictions"][1][0] == list(range(10))


def test_scoring_argmax_ignores_non_digit_tokens():
    # A model that prefers a letter but ranks the right digit first among digits is right.
    def letter_then_needle(prompts):
        logits = oracle(prompts)
        logits[:, ord("x")] = 50.0
        return logits

    grid = passkey_grid(letter_then_needle, TOK, [200], [50], log=None)
    assert grid["mean"] == 1.0


def test_grid_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        passkey_grid(uniform, TOK, [200], [50], batch_size=0, log=None)


def test_grid_reports_progress_with_time_left():
    lines = []
    passkey_grid(uniform, TOK, [150, 300], [0, 100], batch_size=5, log=lines.append, progress_every_s=0)
    assert lines[0] == "passkey: 2 depths x 2 lengths, 8 forward passes of up to 5 prompts, 9,000 tokens"
    progress = [l for l in lines if l.startswith("passkey: ") and "forward passes (" in l]
    # After every pass but the last: 2 cells of 2 passes at length 150, then 2 at 300.
    assert [l.split(" forward")[0] for l in progress] == [f"passkey: {k}/8" for k in range(1, 8)]
    assert progress[0].startswith("passkey: 1/8 forward passes (length 150), 0:00:00 so far, at least ")
    assert progress[-1].startswith("passkey: 7/8 forward passes (length 300)")
    assert sum(l.startswith("passkey length") for l in lines) == 4
    quiet = []
    passkey_grid(uniform, TOK, [150], [0], log=quiet.append)  # default: at most one progress line per 10 s
    assert len(quiet) == 2
