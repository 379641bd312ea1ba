"""lh-eval evaluates a model only on token ids of its own tokenizer: the check, and lh-eval refusing
data and prompts of another tokenizer (in the test process, on an imported tiny Llama)."""

import pytest

from lh_dist.eval.cli import main as lh_eval
from lh_dist.eval.tokenizer_check import check_tokenizer

from hf_models import hf_dataset, hf_run  # noqa: F401  (fixtures)

MODEL = {"sha256": "a" * 64, "vocab_size": 300, "eod_id": 0}


def test_the_check_compares_hash_and_vocabulary_and_the_embedding_size():
    check_tokenizer("data", dict(MODEL, eod_id=5), MODEL, vocab_size=320)  # another separator is the data's choice
    with pytest.raises(ValueError, match="data uses another tokenizer than the model .sha256 bbbb"):
        check_tokenizer("data", dict(MODEL, sha256="b" * 64), MODEL, vocab_size=320)
    with pytest.raises(ValueError, match="more than the model's embedding of 320 rows"):
        check_tokenizer("data", dict(MODEL, vocab_size=1000), None, vocab_size=320)
    # Data written before lh-data recorded hashes: its vocabulary size is all there is to compare.
    check_tokenizer("old data", {"vocab_size": 300}, MODEL, vocab_size=320)
    with pytest.raises(ValueError, match="vocab_size 257 vs 300"):
        check_tokenizer("old data", {"vocab_size": 257}, MODEL, vocab_size=320)
    check_tokenizer("data", {"vocab_size": 257}, None, vocab_size=320)  # the model's unknown: the size decides


def _eval(capsys, *argv) -> tuple[int, str]:
    code = lh_eval([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_lh_eval_refuses_data_and_prompts_of_another_tokenizer(hf_run, hf_dataset, stdlib_dataset, tmp_path,
                                                               capsys):
    run = hf_run[1]
    # Byte-level data (257 ids, all inside the 300-row embedding) would give a loss, of nothing.
    code, err = _eval(capsys, "loss", run, "--data", stdlib_dataset, "--out", tmp_path, "--batches", 1,
                      "--seq-len", 64)
    assert code == 2 and f"--data {stdlib_dataset} uses another tokenizer than the model" in err, err
    assert err.count("\n") == 1
    code, err = _eval(capsys, "passkey", run, "--tokenizer", "byte", "--lengths", 128, "--out", tmp_path)
    assert code == 2 and "--tokenizer byte uses another tokenizer than the model" in err, err
    assert not list(tmp_path.rglob("*.json"))  # refused before any work

    # Its own tokenizer's data is evaluated; pass-key prompts use the run's hf/ tokenizer by default,
    # although the imported config's data.path names no dataset.
    code, err = _eval(capsys, "loss", run, "--data", hf_dataset, "--out", tmp_path, "--batches", 1, "--seq-len", 64)
    assert code == 0, err
    code, err = _eval(capsys, "passkey", run, "--lengths", 128, "--depths", "50", "--out", tmp_path)
    assert code == 0, err
