"""`lh-data` writes MDS shards that read back, through streaming, to exactly the tokens written."""

import itertools
import json

import numpy as np
import pytest

from lh_dist.data.cli import main
from lh_dist.data.corpus import stdlib_documents
from lh_dist.data.shards import validation_score, write_dataset
from lh_dist.data.tokenizer import ByteTokenizer


def _read_split(directory, split):
    """All samples of a split, in order, read with streaming itself."""
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(directory), split=split)
    return [dataset[i]["tokens"] for i in range(dataset.num_samples)]


def test_stdlib_cli_round_trip(tmp_path):
    out = tmp_path / "stdlib"
    args = ["stdlib", "--out", str(out), "--max-docs", "40", "--val-fraction", "0.1", "--shard-size", "65536"]
    assert main(args) == 0

    tok = ByteTokenizer()
    source = [(n, tok.encode(t)) for n, t in stdlib_documents() if t]
    source = dict(itertools.islice(source, 40))
    train, val = _read_split(out, "train"), _read_split(out, "val")
    assert len(train) + len(val) == 40 and len(val) >= 1
    assert all(doc.dtype == np.uint16 for doc in train + val)
    assert len(list((out / "train").glob("shard.*.mds"))) > 1

    # The written documents are the source documents, token for token (compared as
    # multisets: two stdlib files have the same text); the split follows the names.
    def contents(docs):
        return sorted(doc.astype(np.int32).tobytes() for doc in docs)

    assert contents(train + val) == contents(source.values())
    assert contents(val) == contents(ids for n, ids in source.items() if validation_score(n) < 0.1)

    info = json.loads((out / "lh_data.json").read_text())
    assert (info["tokenizer"], info["vocab_size"], info["eod_id"], info["dtype"]) == ("byte", 257, 256, "uint16")
    assert info["source"].startswith("stdlib:")
    assert info["splits"]["train"] == {"documents": len(train), "tokens": sum(map(len, train))}
    assert info["splits"]["val"] == {"documents": len(val), "tokens": sum(map(len, val))}
    lengths = np.load(out / "train" / "doc_lengths.npy")
    assert lengths.tolist() == [len(doc) for doc in train]


def test_refuses_non_empty_output_unless_overwrite(tmp_path, capsys):
    (tmp_path / "note.txt").write_text("keep me")
    args = ["stdlib", "--out", str(tmp_path), "--max-docs", "3", "--val-fraction", "0.3"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(args + ["--overwrite", "--max-docs", "5"]) == 0
    assert json.loads((tmp_path / "lh_data.json").read_text())["splits"]["train"]["documents"] + 1 == 5
    assert (tmp_path / "note.txt").read_text() == "keep me"


def test_a_failed_overwrite_keeps_the_dataset_that_was_there(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["stdlib", "--out", str(out), "--max-docs", "4", "--val-fraction", "0.3"]
    assert main(args) == 0
    before = (out / "lh_data.json").read_text()
    shards = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    # Too few documents for 10M validation tokens: the rebuild fails after the old dataset was set aside.
    assert main(["stdlib", "--out", str(out), "--max-docs", "4", "--val-tokens", "10000000", "--overwrite"]) == 2
    assert "validation" in capsys.readouterr().err
    assert (out / "lh_data.json").read_text() == before
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == shards
    assert _read_split(out, "train")


def test_an_overwrite_killed_midway_leaves_a_complete_dataset(tmp_path):
    from lh_dist.data.shards import REPLACED

    out = tmp_path / "data"
    docs = [(f"doc{i}", f"text {i}") for i in range(10)]
    old = write_dataset(docs, out, ByteTokenizer(), source="old", val_fraction=0.2, log=lambda _: None)
    # As a kill leaves it: the old dataset set aside, a new split half written, no lh_data.json yet.
    (out / REPLACED).mkdir()
    for name in ("lh_data.json", "train", "val"):
        (out / name).rename(out / REPLACED / name)
    (out / "train").mkdir()
    (out / "train" / "shard.00000.mds").write_bytes(b"partial")
    with pytest.raises(FileExistsError):  # the old dataset is back, so a rerun without overwrite refuses
        write_dataset(docs, out, ByteTokenizer(), source="new", val_fraction=0.2, log=lambda _: None)
    assert json.loads((out / "lh_data.json").read_text()) == old and not (out / REPLACED).exists()
    assert len(_read_split(out, "train")) == old["splits"]["train"]["documents"]
    new = write_dataset(docs, out, ByteTokenizer(), source="new", val_fraction=0.2, log=lambda _: None,
                        overwrite=True)
    assert new["source"] == "new" and not (out / REPLACED).exists()


def test_at_least_one_validation_document(tmp_path):
    docs = [(f"doc{i}", f"text {i}") for i in range(10)]
    info = write_dataset(docs, tmp_path, ByteTokenizer(), source="test", val_fraction=1e-9, log=lambda _: None)
    lowest = min(docs, key=lambda d: validation_score(d[0]))
    assert info["splits"]["val"]["documents"] == 1
    assert [bytes(d.astype(np.uint8)).decode() for d in _read_split(tmp_path, "val")] == [lowest[1]]
    with pytest.raises(ValueError, match="val_fraction"):
        write_dataset(docs, tmp_path / "x", ByteTokenizer(), source="test", val_fraction=0.0)


def test_jsonl_and_text_sources_through_cli(tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"document number {i}"}) + "\n" for i in range(20)))
    assert main(["jsonl", "--out", str(tmp_path / "j"), "--field", "body", "--val-tokens", "50", str(jsonl)]) == 0
    docs = _read_split(tmp_path / "j", "train") + _read_split(tmp_path / "j", "val")
    texts = sorted(bytes(d.astype(np.uint8)).decode() for d in docs)
    assert texts == sorted(f"document number {i}" for i in range(20))

    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"{i}.md").write_text(f"# page {i}\n")
    assert main(["text", "--out", str(tmp_path / "t"), "--val-fraction", "0.25", f"{tmp_path}/docs/*.md"]) == 0
    info = json.loads((tmp_path / "t" / "lh_data.json").read_text())
    assert info["splits"]["train"]["documents"] + info["splits"]["val"]["documents"] == 4


def test_hf_tokenizer_dataset_records_its_spec(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["import os\nimport sys\n"] * 10,
        trainers.BpeTrainer(
            vocab_size=280, special_tokens=["<unk>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "data"
    assert main(["stdlib", "--out", str(out), "--max-docs", "5", "--val-fraction", "0.2", "--tokenizer",
                 str(tmp_path / "tokenizer.json")]) == 0
    info = json.loads((out / "lh_data.json").read_text())
    assert info["tokenizer"] == str(tmp_path / "tokenizer.json")
    assert (info["eod_id"], info["vocab_size"]) == (tok.token_to_id("</s>"), tok.get_vocab_size())
    texts = {tok.decode(d.tolist()) for split in ("train", "val") for d in _read_split(out, split)}
    assert texts == {t for _, t in itertools.islice(((n, t) for n, t in stdlib_documents() if t), 5)}


def _docs(lengths):
    return [(f"doc{i}", "x" * n) for i, n in enumerate(lengths)]


def test_val_tokens_takes_whole_documents_in_score_order(tmp_path):
    docs = _docs([300 + 37 * i for i in range(60)])
    info = write_dataset(docs, tmp_path, ByteTokenizer(), source="test", val_tokens=2000, log=lambda _: None)
    val = _read_split(tmp_path, "val")
    assert 2000 <= info["splits"]["val"]["tokens"] == sum(map(len, val)) <= 4000
    # The split is the lowest-scored documents that fit, whatever the source order.
    names = {len(t): n for n, t in docs}
    chosen = sorted(names[len(d)] for d in val)
    info2 = write_dataset(docs[::-1], tmp_path / "rev", ByteTokenizer(), source="test", val_tokens=2000,
                          log=lambda _: None)
    assert sorted(names[len(d)] for d in _read_split(tmp_path / "rev", "val")) == chosen
    assert info2["content_sha256"] != info["content_sha256"]  # other order, other token stream
    again = write_dataset(docs, tmp_path / "again", ByteTokenizer(), source="test", val_tokens=2000,
                          shard_size=2048, log=lambda _: None)
    assert again["content_sha256"] == info["content_sha256"]  # shard size does not matter
    assert info["validation"] == {"val_tokens": 2000}


def test_val_tokens_too_large_for_the_corpus_is_refused_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["stdlib", "--out", str(out), "--max-docs", "4", "--val-tokens", "10000000"]) == 2
    assert "too few for 10,000,000 validation tokens" in capsys.readouterr().err
    assert not out.exists()  # nothing left that would block a rerun
    assert main(["stdlib", "--out", str(out), "--max-docs", "4", "--val-fraction", "0.3"]) == 0


def test_min_doc_tokens_skips_short_documents(tmp_path):
    docs = _docs([10, 5000, 20, 6000, 7000, 30])
    info = write_dataset(docs, tmp_path, ByteTokenizer(), source="test", val_tokens=4000, min_doc_tokens=1000,
                         log=lambda _: None)
    lengths = sorted(map(len, _read_split(tmp_path, "train") + _read_split(tmp_path, "val")))
    assert lengths == [5000, 6000, 7000] and info["min_doc_tokens"] == 1000


def test_one_shot_iterator_with_val_tokens_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="two passes"):
        write_dataset(iter(_docs([100] * 10)), tmp_path, ByteTokenizer(), source="test", val_tokens=100)


@pytest.mark.parametrize("flags, message", [
    (["--val-fraction", "1.5"], "argument --val-fraction: expected a number between 0 and 1 (exclusive), got '1.5'"),
    (["--val-fraction", "half"], "argument --val-fraction: expected a number between 0 and 1 (exclusive)"),
    (["--max-docs", "1"], "argument --max-docs: expected at least 2 (one train and one val document), got '1'"),
    (["--min-doc-tokens", "0"], "argument --min-doc-tokens: expected a positive integer, got '0'"),
])
def test_bad_flags_are_named_as_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        main(["stdlib", "--out", str(tmp_path / "out"), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
