"""`lh-data tree`: files of directory trees grouped into documents by directory or by depth."""

import json

import pytest

from lh_dist.data.cli import main
from lh_dist.data.corpus import tree_documents

FILES = {
    "top.py": "t",
    "pkg/a.py": "a",
    "pkg/b.txt": "not included",
    "pkg/sub/c.py": "c",
    "pkg/sub/deeper/d.py": "d",
    "pkg/tests/test_x.py": "x",
    "other/e.py": "e",
}


@pytest.fixture
def tree(tmp_path):
    for rel, text in FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "pkg" / "latin1.py").write_bytes(b"caf\xe9")  # not UTF-8: skipped
    return tmp_path


def _docs(root, **kwargs):
    return dict(tree_documents([str(root)], ["*.py"], log=lambda _: None, **kwargs))


def test_one_document_per_directory(tree):
    docs = _docs(tree, exclude=["*/tests/*"])
    r = str(tree)
    assert list(docs) == [f"{r}:.", f"{r}:other", f"{r}:pkg", f"{r}:pkg/sub", f"{r}:pkg/sub/deeper"]
    assert docs[f"{r}:pkg"] == "# file: pkg/a.py\na\n"
    assert docs[f"{r}:."] == "# file: top.py\nt\n"


def test_depth_groups_whole_subtrees_in_walk_order(tree):
    docs = _docs(tree, depth=1)
    r = str(tree)
    assert list(docs) == [f"{r}:.", f"{r}:other", f"{r}:pkg"]
    assert docs[f"{r}:pkg"] == ("# file: pkg/a.py\na\n# file: pkg/sub/c.py\nc\n# file: pkg/sub/deeper/d.py\nd\n"
                                "# file: pkg/tests/test_x.py\nx\n")
    assert list(_docs(tree, depth=0)) == [f"{r}:."]


def test_cli_tree_round_trip(tree, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("out") / "data"
    args = ["tree", "--out", str(out), "--include", "*.py", "--doc-depth", "1", "--val-tokens", "20", str(tree)]
    assert main(args) == 0
    info = json.loads((out / "lh_data.json").read_text())
    assert info["source"] == f"tree[depth 1; include *.py; exclude -]:{tree}"
    total = sum(s["tokens"] for s in info["splits"].values())
    assert total == sum(len(t) for t in _docs(tree, depth=1).values())
    assert "skipped 1 files" in capsys.readouterr().out


def test_cli_tree_errors_are_one_line(tmp_path, capsys):
    assert main(["tree", "--out", str(tmp_path / "o"), "--include", "*.py", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
