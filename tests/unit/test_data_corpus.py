"""Document sources: the built-in stdlib corpus, text files and JSON Lines."""

import itertools
import json

import pytest

from lh_dist.data.corpus import jsonl_documents, stdlib_documents, stdlib_root, text_documents


def test_stdlib_corpus_is_large_sorted_and_deterministic():
    names = [name for name, _ in stdlib_documents()]
    assert len(names) > 500
    assert names == sorted(names) and len(set(names)) == len(names)
    assert all(name.endswith(".py") for name in names)
    assert not any("site-packages" in name or "dist-packages" in name for name in names)
    assert "os.py" in names and "json/decoder.py" in names
    first = list(itertools.islice(stdlib_documents(), 20))
    assert first == list(itertools.islice(stdlib_documents(), 20))
    name, text = next(doc for doc in stdlib_documents() if doc[0] == "os.py")
    assert text == (stdlib_root() / "os.py").read_text(encoding="utf-8")


def test_text_documents_from_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("bee")
    (tmp_path / "a.md").write_text("ay")
    (tmp_path / "sub" / "c.md").write_text("sea")
    (tmp_path / "sub" / "d.txt").write_text("dee")
    by_glob = dict(text_documents([f"{tmp_path}/**/*.md"]))
    assert sorted(by_glob.values()) == ["ay", "bee", "sea"]
    by_folder = list(text_documents([str(tmp_path)]))
    assert [text for _, text in by_folder] == ["ay", "bee", "sea", "dee"]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        list(text_documents([f"{tmp_path}/nothing-here*"]))


def test_jsonl_documents_field_and_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two", "x": 1}) + "\n")
    assert list(jsonl_documents([str(path)], field="body")) == [(f"{path}:1", "one"), (f"{path}:3", "two")]
    with pytest.raises(ValueError, match=r"a\.jsonl:1.*'text'"):
        list(jsonl_documents([str(path)]))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:1: invalid JSON"):
        list(jsonl_documents([str(path)]))
