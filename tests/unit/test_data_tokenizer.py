"""Tokenizers: byte-level round trip, Hugging Face tokenizer.json with its eod token."""

import json

import numpy as np
import pytest

from lh_dist.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_round_trip_of_unicode_text():
    tok = load_tokenizer("byte")
    text = "def f(x):\n    return 'héllo ✓ 🐍'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert ids.max() < 256
    assert tok.decode(ids) == text
    assert (tok.eod_id, tok.vocab_size, tok.spec) == (256, 257, "byte")


def test_byte_decode_drops_eod_and_rejects_unknown_ids():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 256, 33]) == "hi!"
    with pytest.raises(ValueError, match="0..256"):
        tok.decode([257])


def _write_tokenizer_json(path, special_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(path))


def test_hf_tokenizer_round_trip_and_eod(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_tokenizer_json(path, ["<unk>", "</s>", "<|sep|>"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok.spec == str(path)
    text = "the lazy fox, naïvely ✓"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges learned from the training text apply
    assert tok.decode(ids) == text
    assert tok.eod_id == tok._tokenizer.token_to_id("</s>")
    assert tok.vocab_size >= int(ids.max()) + 1
    assert load_tokenizer(str(path), eod_token="<|sep|>").eod_id == tok._tokenizer.token_to_id("<|sep|>")


def test_hf_tokenizer_eod_from_config_and_errors(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_tokenizer_json(path, ["<unk>", "<|sep|>"])
    with pytest.raises(ValueError, match="eod_token"):
        load_tokenizer(str(path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|sep|>"}}))
    assert load_tokenizer(str(path)).eod_token == "<|sep|>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(str(path), eod_token="<nope>")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="eod_token"):
        load_tokenizer("byte", eod_token="</s>")
