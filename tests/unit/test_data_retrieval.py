"""`lh-data retrieval`: every query's answer stated earlier at the recorded place, exact lengths,
determinism (the default settings' documents pinned), filler of train and val kept apart, both query
forms and several queries per key, and one-line errors."""

import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest

from lh_dist.data.cli import main
from lh_dist.data.loader import PackedLoader
from lh_dist.data.retrieval import (QUERY, QUERY_FORMS, STATEMENT, RetrievalGenerator, RetrievalSettings,
                                    dataset_generator, encode_item, min_document_length, template_is_canonical)
from lh_dist.data.shards import write_dataset
from lh_dist.data.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()
SETTINGS = RetrievalSettings(doc_tokens=1024, keys=6, queries=4, min_gap=16, value_digits=3, seed=5)
RESTATE3 = dataclasses.replace(SETTINGS, query_form="restate", queries_per_key=3)
ASSERT2 = dataclasses.replace(SETTINGS, queries_per_key=2)
TAG = re.compile(r"# tag(\d+)\n")  # whole lines: a window may cut the first and the last


@pytest.fixture(scope="module")
def filler(tmp_path_factory):
    """40 documents of numbered code-like lines; each line carries its document's tag."""
    documents = [(f"doc{k}", "".join(f"x_{k}_{i} = compute({i})  # tag{k}\n" for i in range(60)))
                 for k in range(40)]
    out = tmp_path_factory.mktemp("filler") / "filler"
    write_dataset(documents, out, TOK, source="test", val_fraction=0.25, log=lambda _: None)
    return out


def _split_tags(path, split):
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(path), split=split)
    text = "".join(TOK.decode(dataset[i]["tokens"]) for i in range(dataset.num_samples))
    return {int(t) for t in TAG.findall(text)}


def _item_text(pieces, key, value):
    return "".join(key if p == "{key}" else value if p == "{value}" else p for p in pieces)


@pytest.mark.parametrize("settings", [SETTINGS, RESTATE3, ASSERT2], ids=["assert", "restate3", "assert2"])
@pytest.mark.parametrize("length", [1024, 700, 3000])
def test_queries_follow_their_statements_at_the_recorded_positions(filler, length, settings):
    generator = RetrievalGenerator(settings, filler, "train")
    per_key = settings.queries_per_key
    for index in range(5):
        document = generator.document(index, length)
        tokens = document.tokens
        assert tokens.shape == (length,) and tokens.dtype == np.int64 and TOK.eod_id not in tokens
        assert len(document.statements) == 6 and sum(s.queried for s in document.statements) == 4
        assert len({s.key for s in document.statements}) == 6 and len(document.queries) == 4 * per_key
        assert [q.start for q in document.queries] == sorted(q.start for q in document.queries)
        for s in document.statements:
            text = _item_text(STATEMENT, s.key, s.value)
            assert TOK.decode(tokens[s.start:s.start + len(text)]) == text
            assert TOK.decode(tokens[s.value_start:s.value_start + 3]) == s.value
        statements = {s.key: s for s in document.statements}
        for q in document.queries:
            stated = statements[q.key]
            assert stated.queried and stated.start == q.statement_start and q.value == stated.value
            text = _item_text(QUERY_FORMS[settings.query_form], q.key, q.value)
            assert TOK.decode(tokens[q.start:q.start + len(text)]) == text
            if settings.query_form == "restate":  # the statement again, token for token
                n = len(text)
                assert np.array_equal(tokens[q.start:q.start + n], tokens[stated.start:stated.start + n])
            # The answer's ids are the stated value's ids, and at least min_gap filler tokens lie between.
            answer = tokens[q.answer_start:q.answer_start + len(q.answer)]
            assert tuple(answer) == q.answer == tuple(tokens[stated.value_start:stated.value_start + len(q.answer)])
            assert q.start - (stated.start + len(_item_text(STATEMENT, q.key, q.value))) >= settings.min_gap
        # Each queried key is asked queries_per_key times; the distance is from the statement, so that a
        # later query's distance is larger than the earlier ones' of its key.
        for key in {q.key for q in document.queries}:
            distances = [q.distance for q in document.queries if q.key == key]
            assert len(distances) == per_key and distances == sorted(distances) and distances[0] > 0
    generator.close()


# sha256 of the little-endian int64 tokens of documents (split, index, length) of SETTINGS, computed by the
# generator before query_form and queries_per_key existed: the defaults must build the same documents.
PINNED = {
    ("train", 0, 1024): "5775f0f4d48ba39679288a2322fcb099914cf4f00aaaeb5a8152ee69f9904545",
    ("train", 1, 1024): "1da486a6ac8f177eab4d3c6a1b5dd1f9ad8dd3564b4198975a1266a80b939a1a",
    ("train", 2, 3000): "16869f634c5c47445da73004ceb4d590c7ae5c5b8f14cb875d925c7984ea00aa",
    ("val", 0, 1024): "dc0dbafed1a35ac9753e32a565947e5d5721fdeeacaf81faa80eb8991ad3100c",
    ("val", 1, 1024): "a2fc95778e8fa6f47fe676bd3d4747256bb7e24017e424df432d401c3f83cbcd",
    ("val", 2, 3000): "a0f501d29da844498ae3a91aaa8c2673fe9055aad2d84fef85a6edfc1301a4a7",
}


def test_default_settings_build_the_documents_pinned_before_the_query_options(filler):
    for split in ("train", "val"):
        generator = RetrievalGenerator(SETTINGS, filler, split)
        for (s, index, length), digest in PINNED.items():
            if s == split:
                tokens = generator.document(index, length).tokens.astype("<i8")
                assert hashlib.sha256(tokens.tobytes()).hexdigest() == digest, (split, index, length)
        generator.close()


def test_settings_recorded_before_the_query_options_read_as_the_defaults():
    recorded = {k: v for k, v in dataclasses.asdict(SETTINGS).items() if k not in ("query_form", "queries_per_key")}
    settings = RetrievalSettings.from_info({"retrieval": recorded | {"version": 1}})
    assert settings == SETTINGS and (settings.query_form, settings.queries_per_key) == ("assert", 1)


def test_several_queries_per_key_lengthen_the_shortest_document():
    # In bytes a statement is 1 + 6 + 9 (key) + 6 + 3 (value) + 2 = 27 and an assert query 35: six statements,
    # 4 * 3 restated queries and the gap, against six statements, four assert queries and the gap.
    assert min_document_length(RESTATE3, TOK) == 6 * 27 + 12 * 27 + 16
    assert min_document_length(SETTINGS, TOK) == 6 * 27 + 4 * 35 + 16


def test_distances_cover_every_octave(filler):
    generator = RetrievalGenerator(SETTINGS, filler, "val")
    distances = np.array([q.distance for i in range(60) for q in generator.document(i, 3000).queries])
    generator.close()
    # Gaps are log-uniform over [16, ~2,700] filler tokens, about 7 octaves with 240 / 7 = 34 queries each
    # (binomial sd 5.4). A distance adds the statement (27 tokens) and the moves to line starts (up to a
    # 40-token line each way), which lifts the shortest gaps into 64-128.
    counts = np.histogram(distances, bins=[64, 128, 256, 512, 1024, 2048])[0]
    assert (counts >= 20).all(), counts
    assert distances.min() >= 16 + 27 and distances.max() > 2048


def test_documents_are_deterministic_and_streams_differ(filler):
    train, val = RetrievalGenerator(SETTINGS, filler, "train"), RetrievalGenerator(SETTINGS, filler, "train")
    other_seed = RetrievalGenerator(RetrievalSettings(**{**vars(SETTINGS), "seed": 6}), filler, "train")
    held_out = RetrievalGenerator(SETTINGS, filler, "val")
    a = train.document(2)
    assert np.array_equal(a.tokens, val.document(2).tokens) and a.queries == val.document(2).queries
    for different in (train.document(3), other_seed.document(2), held_out.document(2)):
        assert not np.array_equal(a.tokens, different.tokens)
        assert {s.key for s in a.statements} != {s.key for s in different.statements}
    for generator in (train, val, other_seed, held_out):
        generator.close()


def test_train_and_val_documents_share_no_filler(filler):
    train_tags, val_tags = _split_tags(filler, "train"), _split_tags(filler, "val")
    assert train_tags and val_tags and not train_tags & val_tags
    for split, tags in (("train", train_tags), ("val", val_tags)):
        generator = RetrievalGenerator(SETTINGS, filler, split)
        seen = {int(t) for i in range(20) for t in TAG.findall(TOK.decode(generator.document(i).tokens))}
        generator.close()
        assert seen <= tags and len(seen) > 1


def test_items_start_lines_of_the_filler(filler):
    generator = RetrievalGenerator(SETTINGS, filler, "val")
    document = generator.document(0)
    generator.close()
    # Every filler line is at most 40 tokens, so every item finds a line start within MAX_SNAP.
    starts = [s.start for s in document.statements] + [q.start for q in document.queries]
    assert all(p == 0 or document.tokens[p - 1] == ord("\n") for p in starts)


def _hf_tokenizer(tmp_path, kind):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = byte_level if kind == "gpt2" else pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    # Text rich in the templates' pieces, so that BPE learns merges across their boundaries if it can.
    corpus = [_item_text(STATEMENT, f"kv-{rng.integers(16 ** 6):06x}", f"{rng.integers(10 ** 6):06d}")
              + _item_text(QUERY, f"kv-{rng.integers(16 ** 6):06x}", f"{rng.integers(10 ** 6):06d}")
              + "    return value\n" for _ in range(300)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / f"{kind}.json"
    tok.save(str(path))
    return load_tokenizer(str(path))


@pytest.mark.parametrize("kind", ["byte", "gpt2", "digits"])
def test_value_tokens_are_the_same_in_statement_and_query(tmp_path, kind):
    tokenizer = TOK if kind == "byte" else _hf_tokenizer(tmp_path, kind)
    assert template_is_canonical(tokenizer)
    for key, value in (("kv-3f9a2c", "481516"), ("kv-000aaa", "1"), ("kv-ffffff", "999999999")):
        assert template_is_canonical(tokenizer, key, value)
        stated, s_at, s_len = encode_item(tokenizer, STATEMENT, key, value)
        asked, q_at, q_len = encode_item(tokenizer, QUERY, key, value)
        assert stated[s_at:s_at + s_len] == asked[q_at:q_at + q_len] == tokenizer.encode(value).tolist()
        if kind == "digits":
            assert s_len == len(value)


def test_cli_writes_the_documents_one_per_training_sample(filler, tmp_path):
    out = tmp_path / "retrieval"
    assert main(["retrieval", "--out", str(out), "--filler", str(filler), "--doc-tokens", "1,024",
                 "--train-docs", "5", "--val-docs", "3", "--keys", "6", "--queries", "4", "--min-gap", "16",
                 "--value-digits", "3", "--seed", "5", "--shard-size", "4096"]) == 0
    info = json.loads((out / "lh_data.json").read_text())
    assert info["splits"] == {"train": {"documents": 5, "tokens": 5 * 1024},
                              "val": {"documents": 3, "tokens": 3 * 1024}}
    assert (info["tokenizer"], info["eod_id"], info["vocab_size"], info["min_doc_tokens"]) == ("byte", 256, 257, 1024)
    assert info["tokenizer_identity"] == json.loads((filler / "lh_data.json").read_text())["tokenizer_identity"]
    recorded = info["retrieval"]
    assert RetrievalSettings.from_info(info) == SETTINGS and recorded["filler"] == str(filler.resolve())
    assert recorded["statement"] == _item_text(STATEMENT, "{key}", "{value}")
    assert (recorded["query_form"], recorded["queries_per_key"]) == ("assert", 1)
    # A loader at seq_len = doc-tokens gives one whole document per sample, then its end-of-document token.
    loader = PackedLoader(str(out), "val", seq_len=1024, micro_batch=1, dp_rank=0, dp_degree=1, seed=0)
    generator = dataset_generator(out, "val")
    for i in range(3):
        assert np.array_equal(loader.packed_sample(i), np.append(generator.document(i).tokens, 256))
    loader.close()
    generator.close()
    # The filler moved away: reading the set names it and the option that gives its new place.
    info["retrieval"]["filler"] = str(tmp_path / "moved")
    (out / "lh_data.json").write_text(json.dumps(info))
    with pytest.raises(FileNotFoundError, match=r"the filler corpus of .*, .*moved, is not there: moved\? pass "
                                                r"its place \(--filler\)"):
        dataset_generator(out, "val")
    dataset_generator(out, "val", filler).close()


def test_cli_records_the_query_options_and_evaluation_rebuilds_the_documents(filler, tmp_path):
    out = tmp_path / "restated"
    assert main(["retrieval", "--out", str(out), "--filler", str(filler), "--doc-tokens", "1024",
                 "--train-docs", "2", "--val-docs", "2", "--keys", "6", "--queries", "4", "--min-gap", "16",
                 "--value-digits", "3", "--seed", "5", "--query-form", "restate", "--queries-per-key", "3"]) == 0
    info = json.loads((out / "lh_data.json").read_text())
    assert RetrievalSettings.from_info(info) == RESTATE3
    assert info["retrieval"]["query"] == info["retrieval"]["statement"]
    loader = PackedLoader(str(out), "val", seq_len=1024, micro_batch=1, dp_rank=0, dp_degree=1, seed=0)
    generator = dataset_generator(out, "val")
    assert len(generator.document(1).queries) == 12
    assert np.array_equal(loader.packed_sample(1), np.append(generator.document(1).tokens, 256))
    loader.close()
    generator.close()


@pytest.mark.parametrize("options, message", [
    (["--doc-tokens", "20000"],
     "split 'val' has 16,384 tokens, fewer than the 20,000 that a 20,000-token document needs"),
    (["--doc-tokens", "300"], "a document of 300 tokens cannot hold 32 statements, 16 queries and a gap of 64"),
    (["--keys", "4"], "queries must not exceed keys (one query per key), got 16 > 4"),
    (["--filler", "MISSING"], "filler dataset not found"),
    (["--query-form", "ask"], "query_form must be one of assert, restate, got 'ask'"),
    (["--queries-per-key", "0"], "queries_per_key must be a positive integer, got 0"),
    (["--doc-tokens", "1400", "--queries-per-key", "2"],
     "a document of 1,400 tokens cannot hold 32 statements, 32 queries and a gap of 64"),
])
def test_bad_input_is_one_line_and_writes_nothing(filler, tmp_path, capsys, options, message):
    out = tmp_path / "out"
    argv = ["retrieval", "--out", str(out), "--filler", str(filler), "--doc-tokens", "2048", "--train-docs", "2"]
    argv += [str(tmp_path / "missing") if o == "MISSING" else o for o in options]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("lh-data: error: ")
    assert not out.exists()
