"""Long-range retrieval: does the model read a value stated thousands of tokens earlier?

Held-out documents of `lh-data retrieval` (its generator, val stream, filler from the filler
dataset's val split) are built at each context length and run once each, teacher-forced. A
query is correct when the argmax prediction of every value token, at the positions that
predict them, equals the value. Accuracy is reported by (depth of the key's statement as a
fraction of the document, in equal bins; context length), by distance from statement to
query (octaves), and overall, each with its binomial standard error sqrt(p (1 - p) / n) over
the queries it counts. A model that guesses a value without reading it is right with
probability 10^-digits; one that copies some stated value, 1 / keys. Beside it, the share of
value tokens predicted right (by length, by distance and overall) shows partial reading, where
whole values are still missed: a model that only knows a value is digits gets about 1/10.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from lh_dist.data.retrieval import RetrievalDocument
from lh_dist.eval.passkey import scaled_lengths


def default_lengths(seq_len: int, min_length: int, multiple: int = 2) -> list[int]:
    """Pass-key's lengths scaled to seq_len (`scaled_lengths`), keeping those of at least `min_length` tokens."""
    return [n for n in scaled_lengths(seq_len, multiple) if n >= min_length]


def score_documents(argmax_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    documents: Sequence[RetrievalDocument]) -> list[list[tuple[bool, ...]]]:
    """Whether each value token of each query of each document is predicted right, in one forward
    pass of documents of one length. argmax_fn maps tokens [B, N] and positions [P] to next-token
    argmaxes [B, P]."""
    tokens = torch.from_numpy(np.stack([d.tokens for d in documents]))  # [B, N]
    # Position p predicts token p + 1: the answer's tokens are predicted from the one before each.
    wanted = sorted({q.answer_start + i - 1 for d in documents for q in d.queries for i in range(len(q.answer))})
    column = {p: j for j, p in enumerate(wanted)}
    predicted = argmax_fn(tokens, torch.tensor(wanted, dtype=torch.long))  # [B, P]
    return [[tuple(int(predicted[b, column[q.answer_start + i - 1]]) == t for i, t in enumerate(q.answer))
             for q in d.queries] for b, d in enumerate(documents)]


def _accuracy(correct: np.ndarray) -> tuple[float, float, int]:
    """(accuracy, binomial standard error, count) of booleans; NaNs when empty."""
    n = len(correct)
    if not n:
        return math.nan, math.nan, 0
    p = float(np.mean(correct))
    return p, math.sqrt(p * (1 - p) / n), n


def distance_edges(max_length: int, min_distance: int) -> list[int]:
    """Octave edges [2^a, 2^(a+1), ..., >= max_length] covering every distance from min_distance."""
    first = 2 ** int(math.floor(math.log2(max(min_distance, 1))))
    edges = [first]
    while edges[-1] < max_length:
        edges.append(edges[-1] * 2)
    return edges


def retrieval_grid(argmax_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], generator,
                   lengths: Sequence[int], num_docs: int, depth_bins: int = 5, batch_size: int = 1,
                   log: Callable[[str], None] | None = print) -> dict:
    """Score `num_docs` held-out documents at each length (documents 0..num_docs-1 of the
    generator's split at that length).

    Returns {"depth_edges": [bins + 1] fractions, "accuracy", "stderr": [bins][lengths] (None in
    empty cells), "queries": [bins][lengths] counts, "by_length": [{length, accuracy, stderr,
    queries, token_accuracy}], "by_distance": [{start, end (exclusive), accuracy, stderr, queries,
    token_accuracy}], "mean", "mean_stderr", "num_queries", "token_accuracy" (share of value tokens
    predicted right), "chance" (of guessing a value)}.
    """
    if num_docs < 1 or depth_bins < 1 or batch_size < 1:
        raise ValueError(f"num_docs, depth_bins and batch_size must be positive integers, got "
                         f"{num_docs}, {depth_bins}, {batch_size}")
    records = []  # (length index, depth, distance, correct, share of value tokens right) per query
    start = time.monotonic()
    if log is not None:
        log(f"retrieval: {num_docs} documents x {len(lengths)} lengths, {generator.settings.num_queries} queries "
            f"each, {num_docs * sum(lengths):,} tokens")
    for j, length in enumerate(lengths):
        correct_here, share_here = [], []
        for first in range(0, num_docs, batch_size):
            documents = [generator.document(i, length) for i in range(first, min(first + batch_size, num_docs))]
            for document, tokens_right in zip(documents, score_documents(argmax_fn, documents)):
                for query, right in zip(document.queries, tokens_right):
                    records.append((j, query.statement_start / length, query.distance, all(right),
                                    sum(right) / len(right)))
                    correct_here.append(all(right))
                    share_here.append(sum(right) / len(right))
        if log is not None:
            log(f"retrieval length {length:,}: accuracy {np.mean(correct_here):.3f} (value tokens "
                f"{np.mean(share_here):.3f}) over {len(correct_here)} queries, {time.monotonic() - start:.0f}s so far")

    length_index, depth, distance, correct, token_share = (np.array(column) for column in zip(*records))

    def token_accuracy(mask: np.ndarray) -> float:
        """Share of value tokens right over the queries of `mask` (their values are equally long)."""
        return float(token_share[mask].mean()) if mask.any() else math.nan

    edges = np.linspace(0.0, 1.0, depth_bins + 1)
    depth_bin = np.minimum(np.searchsorted(edges, depth, side="right") - 1, depth_bins - 1)
    cells = [[_accuracy(correct[(depth_bin == i) & (length_index == j)]) for j in range(len(lengths))]
             for i in range(depth_bins)]
    by_length = [dict(zip(("accuracy", "stderr", "queries"), _accuracy(correct[length_index == j])), length=n,
                      token_accuracy=token_accuracy(length_index == j)) for j, n in enumerate(lengths)]
    d_edges = distance_edges(max(lengths), int(distance.min()))
    octaves = list(zip(d_edges, d_edges[1:]))
    in_octave = [(distance >= lo) & (distance < hi) for lo, hi in octaves]
    by_distance = [dict(zip(("accuracy", "stderr", "queries"), _accuracy(correct[mask])), start=lo, end=hi,
                        token_accuracy=token_accuracy(mask)) for (lo, hi), mask in zip(octaves, in_octave)]
    mean, mean_stderr, total = _accuracy(correct)
    return {"depth_edges": edges.tolist(),
            "accuracy": [[c[0] for c in row] for row in cells], "stderr": [[c[1] for c in row] for row in cells],
            "queries": [[c[2] for c in row] for row in cells], "by_length": by_length, "by_distance": by_distance,
            "mean": mean, "mean_stderr": mean_stderr, "num_queries": total,
            "token_accuracy": token_accuracy(np.ones(total, dtype=bool)),
            "chance": 10.0 ** -generator.settings.value_digits}
