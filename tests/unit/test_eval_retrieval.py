"""Retrieval scoring with test doubles in place of a model: one that reads the stated value scores
1.0, one that always says the same digit scores chance, one that sees only nearby tokens scores by distance."""

import math
import re

import numpy as np
import pytest
import torch

from lh_dist.data.retrieval import RetrievalGenerator, RetrievalSettings
from lh_dist.data.tokenizer import ByteTokenizer
from lh_dist.eval.outputs import retrieval_name
from lh_dist.eval.retrieval import default_lengths, distance_edges, retrieval_grid, score_documents

TOK = ByteTokenizer()
# An open query of either form: "assert keys[k] == v" or a restated "keys[k] = v", its value cut short.
OPEN_QUERY = re.compile(r'\n(?:assert )?keys\["(kv-[0-9a-f]{6})"\] ==? "(\d*)$')


def reader(window: int | None = None):
    """next_token_argmax of a model that finds the open query's key among the statements in the last
    `window` tokens (all of them if None) and says the next digit of its value, else a space."""
    def argmax(tokens, positions):
        out = torch.full((tokens.shape[0], len(positions)), ord(" "), dtype=torch.long)
        for b, row in enumerate(tokens.tolist()):
            for j, p in enumerate(positions.tolist()):
                text = TOK.decode(row[0 if window is None else max(0, p + 1 - window):p + 1])
                query = OPEN_QUERY.search(text)
                stated = query and re.search(rf'\nkeys\["{query.group(1)}"\] = "(\d+)"', text)
                if stated and len(query.group(2)) < len(stated.group(1)):
                    out[b, j] = ord(stated.group(1)[len(query.group(2))])
        return out
    return argmax


def constant(digit: str):
    def argmax(tokens, positions):
        return torch.full((tokens.shape[0], len(positions)), ord(digit), dtype=torch.long)
    return argmax


@pytest.fixture(scope="module")
def generator(stdlib_dataset):
    generator = RetrievalGenerator(RetrievalSettings(doc_tokens=1024, keys=6, queries=4, min_gap=16,
                                                     value_digits=2), stdlib_dataset, "val")
    yield generator
    generator.close()


def test_a_model_that_reads_the_statement_scores_one(generator):
    grid = retrieval_grid(reader(), generator, [600, 1024], num_docs=5, depth_bins=4, batch_size=2, log=None)
    assert grid["mean"] == 1.0 and grid["mean_stderr"] == 0.0 and grid["num_queries"] == 2 * 5 * 4
    queries = np.array(grid["queries"])
    assert queries.shape == (4, 2) and queries.sum(axis=0).tolist() == [20, 20]
    assert all(a == 1.0 if n else math.isnan(a) for a, n in zip(np.ravel(grid["accuracy"]), queries.ravel()))
    assert [r["accuracy"] for r in grid["by_length"]] == [1.0, 1.0]
    assert grid["token_accuracy"] == 1.0 and [r["token_accuracy"] for r in grid["by_length"]] == [1.0, 1.0]
    assert sum(r["queries"] for r in grid["by_distance"]) == 40
    assert grid["depth_edges"] == [0.0, 0.25, 0.5, 0.75, 1.0] and grid["chance"] == pytest.approx(0.01)


@pytest.mark.parametrize("form, per_key", [("restate", 3), ("assert", 2)])
def test_a_reader_scores_one_on_restated_and_repeated_queries(stdlib_dataset, form, per_key):
    settings = RetrievalSettings(doc_tokens=1024, keys=6, queries=4, min_gap=16, value_digits=2,
                                 query_form=form, queries_per_key=per_key)
    generator = RetrievalGenerator(settings, stdlib_dataset, "val")
    documents = [generator.document(i, 1024) for i in range(4)]
    grid = retrieval_grid(reader(), generator, [800, 1024], num_docs=4, batch_size=2, log=None)
    generator.close()
    assert grid["mean"] == 1.0 and grid["num_queries"] == 2 * 4 * 4 * per_key
    # The scored positions are the value tokens of each query, whatever its form: the tokens there are the value.
    for d in documents:
        for q in d.queries:
            assert TOK.decode(d.tokens[q.answer_start:q.answer_start + len(q.answer)]) == q.value
            prefix = TOK.decode(d.tokens[q.start:q.answer_start])
            assert prefix == (f'\nkeys["{q.key}"] = "' if form == "restate" else f'\nassert keys["{q.key}"] == "')
    # Distances stay those from the statement: the by-distance table counts every query once.
    assert sum(r["queries"] for r in grid["by_distance"]) == grid["num_queries"]


@pytest.mark.parametrize("form, per_key", [("assert", 1), ("restate", 2)])
def test_a_constant_model_scores_chance(stdlib_dataset, form, per_key):
    settings = RetrievalSettings(doc_tokens=1024, keys=8, queries=8, min_gap=16, value_digits=1, seed=1,
                                 query_form=form, queries_per_key=per_key)
    generator = RetrievalGenerator(settings, stdlib_dataset, "val")
    grid = retrieval_grid(constant("7"), generator, [1024], num_docs=40, batch_size=8, log=None)
    values = [q.value for i in range(40) for q in generator.document(i, 1024).queries]
    generator.close()
    n = 320 * per_key
    assert len(values) == n == grid["num_queries"]
    # Exactly the queries whose one-digit value is 7, which for uniform digits is 1 in 10. The 320 keys are
    # independent draws (a key's repeats share its value, which only widens the spread): within four binomial
    # standard errors over the keys (sqrt(0.1 * 0.9 / 320) = 0.017) of 0.1.
    assert grid["mean"] == pytest.approx(values.count("7") / n, abs=1e-12)
    assert abs(grid["mean"] - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 320)
    assert grid["mean_stderr"] == pytest.approx(math.sqrt(grid["mean"] * (1 - grid["mean"]) / n))


def test_value_tokens_right_count_the_digits_a_constant_model_hits(stdlib_dataset):
    # Two-digit values: a query is right only when both digits are 7, but every 7 counts as a value token right.
    settings = RetrievalSettings(doc_tokens=1024, keys=8, queries=8, min_gap=16, value_digits=2, seed=2)
    generator = RetrievalGenerator(settings, stdlib_dataset, "val")
    grid = retrieval_grid(constant("7"), generator, [1024], num_docs=20, batch_size=4, log=None)
    values = [q.value for i in range(20) for q in generator.document(i, 1024).queries]
    generator.close()
    assert grid["mean"] == pytest.approx(values.count("77") / len(values), abs=1e-12)
    assert grid["token_accuracy"] == pytest.approx("".join(values).count("7") / (2 * len(values)), abs=1e-12)
    assert grid["token_accuracy"] > grid["mean"]


def test_a_model_that_sees_256_tokens_fails_beyond_them(generator):
    grid = retrieval_grid(reader(window=256), generator, [1024], num_docs=10, depth_bins=2, log=None)
    by_distance = {(b["start"], b["end"]): b for b in grid["by_distance"] if b["queries"]}
    # The statement must lie inside the window: distance + query prefix (30 tokens) + value <= 256.
    assert all(b["accuracy"] == 1.0 for (lo, hi), b in by_distance.items() if hi <= 128)
    assert all(b["accuracy"] == 0.0 for (lo, hi), b in by_distance.items() if lo >= 256)
    assert 0.0 < grid["mean"] < 1.0


def test_score_documents_batches_documents_with_different_answer_positions(generator):
    documents = [generator.document(i, 800) for i in range(3)]
    positions_seen = []

    def argmax(tokens, positions):
        positions_seen.append(positions)
        return reader()(tokens, positions)

    assert score_documents(argmax, documents) == [[(True, True)] * 4] * 3  # two value tokens per query
    wanted = {q.answer_start + i - 1 for d in documents for q in d.queries for i in range(len(q.answer))}
    assert positions_seen[0].tolist() == sorted(wanted)


def test_lengths_edges_and_names():
    assert default_lengths(98_304, 2000, multiple=4) == [4096, 8192, 16384, 32768, 65536, 98304]
    assert default_lengths(1024, 300) == [340, 682, 1024]
    assert distance_edges(1000, 40) == [32, 64, 128, 256, 512, 1024]
    assert retrieval_name([4096, 8192], 16, 5) == "retrieval-4096_8192"
    assert retrieval_name([4096], 64, 10) == "retrieval-4096-docs64-bins10"
    assert retrieval_name([4096], 16, 5, data="d").startswith("retrieval-4096-cfg")
    assert retrieval_name([4096], 16, 5, filler="f") != retrieval_name([4096], 16, 5, data="f")


@pytest.mark.parametrize("command", ["lh-data", "lh-eval"])
def test_help_documents_the_options_and_an_example(command, capsys):
    from lh_dist.data.cli import main as lh_data
    from lh_dist.eval.cli import main as lh_eval

    with pytest.raises(SystemExit) as stop:
        (lh_data if command == "lh-data" else lh_eval)(["retrieval", "-h"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    expected = (["--filler", "--doc-tokens", "--train-docs", "(default: 32)", "--min-gap", "--value-digits",
                 'keys["kv-3f9a2c"] = "481516"', "example: lh-data retrieval"] if command == "lh-data" else
                ["--data", "--filler", "--lengths", "(default: 16)", "--depth-bins", "example: lh-eval retrieval"])
    for piece in expected:
        assert piece in text, piece
    assert "(default: None)" not in text
