"""Simplified needle in a haystack (the paper's App. F): retrieve one digit hidden in random filler.

A prompt of exactly `length` tokens is, in token space:

    [eod] filler[:a] NEEDLE(d) filler[a:] QUESTION

    NEEDLE(d) = " The pass key is d. Remember it. d is the pass key. "
    QUESTION  = " What is the pass key? The pass key is "

The leading end-of-document token marks a document start, as in the packed training
stream. `a` puts the needle at `depth` percent of the filler: 0 right after the document
start, 100 right before the question. The prediction is the argmax of the last position's
logits over the ten digit tokens; a cell (depth, length) is the accuracy over d = 0..9,
so a model that ignores the needle scores exactly 0.1.

The filler is random words of ASCII letters. The paper says "alphanumeric"; digits are left
out so that the needle is the only digit in the prompt and copying a nearby digit cannot
score. One filler is drawn per (seed, length) and shared by every depth and digit, so the
cells of a column differ only in where the needle sits.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

PAPER_DEPTHS = (0, 15, 30, 50, 70, 85, 100)
# The paper's context lengths {4, 8, 16, 32, 64, 96}K as fractions of its 96K training context.
PAPER_LENGTH_FRACTIONS = (1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3, 1)
NEEDLE = (" The pass key is ", "{d}", ". Remember it. ", "{d}", " is the pass key. ")
QUESTION = " What is the pass key? The pass key is "
DIGITS = "0123456789"


def digit_token_ids(tokenizer) -> list[int]:
    """Token id of each digit 0..9; raises ValueError unless every digit is a single token."""
    ids = []
    for d in DIGITS:
        encoded = tokenizer.encode(d)
        if len(encoded) != 1:
            raise ValueError(f"tokenizer {tokenizer.spec!r} encodes digit {d!r} as {len(encoded)} tokens; "
                             f"the pass-key test needs one token per digit")
        ids.append(int(encoded[0]))
    return ids


def _needle_ids(tokenizer, digit_id: int) -> list[int]:
    # Encoded piece by piece so that the digit is always its own token, whatever the tokenizer merges.
    ids = []
    for piece in NEEDLE:
        ids += [digit_id] if piece == "{d}" else tokenizer.encode(piece).tolist()
    return ids


def min_prompt_length(tokenizer) -> int:
    """Tokens of a prompt with no filler at all."""
    return 1 + len(_needle_ids(tokenizer, digit_token_ids(tokenizer)[0])) + len(tokenizer.encode(QUESTION))


def filler_ids(tokenizer, num_tokens: int, seed: int | list[int]) -> list[int]:
    """`num_tokens` tokens of random letter words (no digits), reproducible from seed."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(string.ascii_letters.encode(), dtype=np.uint8)
    ids: list[int] = []
    while len(ids) < num_tokens:
        # Words of 2..8 letters, each after a space; loop in case a tokenizer packs letters densely.
        word_lengths = rng.integers(2, 9, size=num_tokens // 2 + 16)
        chars = rng.choice(letters, size=int(word_lengths.sum()))
        starts = np.cumsum(word_lengths) - word_lengths
        text = np.insert(chars, starts, ord(" ")).tobytes().decode("ascii")
        ids += tokenizer.encode(text).tolist()
    return ids[:num_tokens]


def needle_offset(num_filler: int, depth: float) -> int:
    """Filler tokens before the needle for a depth in percent."""
    return round(num_filler * depth / 100)


def build_prompt(tokenizer, length: int, depth: float, digit: int, seed: int = 0) -> torch.Tensor:
    """LongTensor [length]: the pass-key prompt with `digit` hidden at `depth` percent."""
    if not 0 <= depth <= 100:
        raise ValueError(f"depth must be a percentage in [0, 100], got {depth}")
    if digit not in range(10):
        raise ValueError(f"digit must be one of 0..9, got {digit}")
    shortest = min_prompt_length(tokenizer)
    if length < shortest:
        raise ValueError(f"length must be >= {shortest} tokens (the needle and question alone), got {length}")
    num_filler = length - shortest
    filler = filler_ids(tokenizer, num_filler, seed=[seed, length])
    a = needle_offset(num_filler, depth)
    needle = _needle_ids(tokenizer, digit_token_ids(tokenizer)[digit])
    ids = [tokenizer.eod_id] + filler[:a] + needle + filler[a:] + tokenizer.encode(QUESTION).tolist()
    assert len(ids) == length
    return torch.tensor(ids, dtype=torch.long)


def predict_digits(last_logits: torch.Tensor, digit_ids: Sequence[int]) -> torch.Tensor:
    """Predicted digit [B] from last-position logits [B, V]: argmax over the ten digit tokens."""
    return last_logits[:, list(digit_ids)].argmax(dim=-1)


def passkey_grid(last_logits_fn: Callable[[torch.Tensor], torch.Tensor], tokenizer, lengths: Sequence[int],
                 depths: Sequence[float] = PAPER_DEPTHS, seed: int = 0, batch_size: int = 1,
                 log: Callable[[str], None] | None = print, progress_every_s: float = 10.0) -> dict:
    """Run the test for every (depth, length) cell.

    last_logits_fn maps prompts [B, N] to last-position logits [B, V].
    log gets one line per cell and, at most every progress_every_s seconds, a progress line
    (forward passes done, time so far and left).
    Returns {"accuracy": [depths][lengths] floats, "predictions": [depths][lengths][10] ints, "mean": float}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    digit_ids = digit_token_ids(tokenizer)
    accuracy = np.zeros((len(depths), len(lengths)))
    predictions = np.zeros((len(depths), len(lengths), 10), dtype=np.int64)
    batches = range(0, 10, batch_size)
    total_passes = len(lengths) * len(depths) * len(batches)
    # Time left is estimated from the tokens still to run at the pace so far; attention's cost grows
    # faster than the length, so with longer prompts ahead it is a lower bound.
    total_tokens, done_tokens, done_passes = 10 * len(depths) * sum(lengths), 0, 0
    start = last_log = time.monotonic()
    if log is not None:
        log(f"passkey: {len(depths)} depths x {len(lengths)} lengths, {total_passes} forward passes of up to "
            f"{batch_size} prompts, {total_tokens:,} tokens")
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            prompts = torch.stack([build_prompt(tokenizer, length, depth, d, seed) for d in range(10)])  # [10, N]
            predicted = []
            for b in batches:
                predicted.append(predict_digits(last_logits_fn(prompts[b:b + batch_size]), digit_ids))
                done_passes += 1
                done_tokens += prompts[b:b + batch_size].numel()
                now = time.monotonic()
                if log is not None and now - last_log >= progress_every_s and done_passes < total_passes:
                    last_log, elapsed = now, now - start
                    left = elapsed * (total_tokens - done_tokens) / done_tokens
                    log(f"passkey: {done_passes}/{total_passes} forward passes (length {length:,}), "
                        f"{_duration(elapsed)} so far, at least {_duration(left)} left")
            predicted = torch.cat(predicted)
            predictions[i, j] = predicted.numpy()
            accuracy[i, j] = float((predicted == torch.arange(10)).float().mean())
            if log is not None:
                log(f"passkey length {length:,} depth {depth:g}%: accuracy {accuracy[i, j]:.1f}")
    return {"accuracy": accuracy.tolist(), "predictions": predictions.tolist(), "mean": float(accuracy.mean())}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def scaled_lengths(seq_len: int, multiple: int = 2) -> list[int]:
    """The paper's lengths scaled to a training context: seq_len x {1/24, 1/12, 1/6, 1/3, 2/3, 1},
    rounded down to `multiple` (zigzag sharding)."""
    return sorted({int(seq_len * f) // multiple * multiple for f in PAPER_LENGTH_FRACTIONS})


def default_lengths(seq_len: int, tokenizer, multiple: int = 2) -> list[int]:
    """`scaled_lengths`, keeping those long enough for a prompt (`min_prompt_length`)."""
    shortest = min_prompt_length(tokenizer)
    return [n for n in scaled_lengths(seq_len, multiple) if n >= shortest]
