"""Corrupt or mistaken Hugging Face files given to lh-data and lh-import: each is refused with exit status 2
and one line on stderr that names the file, never a traceback of the library that parsed it."""

import json
import shutil

import pytest

from lh_dist.data.cli import main as lh_data
from lh_dist.hf.importer import main as lh_import

from hf_models import save_hf_model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama folder as save_pretrained writes it."""
    return save_hf_model("llama", tmp_path_factory.mktemp("hf") / "llama")


def _one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


def test_lh_data_refuses_a_file_that_is_not_a_tokenizer_json(source, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "def main():\n    return 0\n"}) + "\n")
    corrupt = tmp_path / "corrupt" / "tokenizer.json"
    corrupt.parent.mkdir()
    corrupt.write_text((source / "tokenizer.json").read_text()[:500])  # cut short
    for tokenizer in (source / "tokenizer_config.json", corrupt):  # valid JSON of another kind; not JSON
        assert lh_data(["jsonl", "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out"), str(docs)]) == 2
        assert f"{tokenizer} is not a Hugging Face tokenizer.json" in _one_line_error(capsys, "lh-data")
    assert not (tmp_path / "out").exists()


def test_lh_data_names_a_corrupt_tokenizer_config_beside_the_tokenizer(source, tmp_path, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(source / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text('{"eos_token": ')
    assert lh_data(["stdlib", "--tokenizer", str(folder), "--out", str(tmp_path / "out"), "--max-docs", "2"]) == 2
    assert f"{folder / 'tokenizer_config.json'} is not valid JSON" in _one_line_error(capsys, "lh-data")


@pytest.mark.parametrize("name, corrupt", [
    ("tokenizer.json", lambda text: text[:500]),
    ("tokenizer_config.json", lambda text: text[:-5]),
    ("config.json", lambda text: text[:-5]),
    ("config.json", lambda text: "[1, 2]"),  # JSON, but not an object
])
def test_lh_import_names_a_corrupt_json_file(source, tmp_path, capsys, name, corrupt):
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    (folder / name).write_text(corrupt((folder / name).read_text()))
    assert lh_import([str(folder), "--out", str(tmp_path / "run")]) == 2
    assert str(folder / name) in _one_line_error(capsys, "lh-import")
    assert not (tmp_path / "run").exists()


def test_lh_import_names_a_truncated_safetensors_file(source, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    for cut in (4, len(data) // 2):  # inside the header's length; inside the tensor data
        weights.write_bytes(data[:cut])
        assert lh_import([str(folder), "--out", str(tmp_path / "run")]) == 2
        assert f"weight file {weights} cannot be read" in _one_line_error(capsys, "lh-import")
        assert not (tmp_path / "run").exists()
