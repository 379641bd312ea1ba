"""Tokenizers: the byte-level default and Hugging Face `tokenizers` files.

Both expose `encode(text) -> np.ndarray[int32]`, `decode(ids) -> str`, `eod_id`,
`vocab_size`, `spec` (the string that `load_tokenizer` turns back into it) and
`identity()` (what data and models record to tell tokenizers apart).
"""

import hashlib
import json
from pathlib import Path

import numpy as np

# Tried in order when a tokenizer.json names no end-of-document token itself.
_COMMON_EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus one end-of-document id (256)."""

    spec = "byte"
    eod_id = 256
    vocab_size = 257

    def encode(self, text: str) -> np.ndarray:
        """int32 ids [len(text as UTF-8)]: one per byte (no end-of-document id)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Bytes back to text; end-of-document ids are dropped, invalid UTF-8 is replaced."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > self.eod_id):
            raise ValueError(f"ids must lie in 0..{self.eod_id} for the byte tokenizer")
        return ids[ids != self.eod_id].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def identity(self) -> dict:
        """{"sha256", "vocab_size", "eod_id"}: equal exactly when two tokenizers give the same ids."""
        return {"sha256": hashlib.sha256(b"lh_dist byte tokenizer").hexdigest(), "vocab_size": self.vocab_size,
                "eod_id": self.eod_id}


class HFTokenizer:
    """A Hugging Face `tokenizer.json` file, read with the `tokenizers` package.

    The end-of-document token is `eod_token` if given, else the `eos_token` of a
    `tokenizer_config.json` beside the file, else the first common end token
    (`<|endoftext|>`, `</s>`, ...) that the vocabulary holds.
    """

    def __init__(self, path: str, eod_token: str | None = None):
        from tokenizers import Tokenizer  # heavy; only needed for this tokenizer

        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._tokenizer = Tokenizer.from_file(self.path)
        except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json ({e})") from None
        self.eod_token = eod_token or self._find_eod_token()
        eod_id = self._tokenizer.token_to_id(self.eod_token)
        if eod_id is None:
            raise ValueError(f"eod_token {self.eod_token!r} is not in the vocabulary of {self.path}")
        self.eod_id = eod_id
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.spec = self.path

    def _find_eod_token(self) -> str:
        config_path = Path(self.path).with_name("tokenizer_config.json")
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except ValueError as e:
                raise ValueError(f"{config_path} is not valid JSON ({e})") from None
            eos = config.get("eos_token") if isinstance(config, dict) else None
            if isinstance(eos, dict):  # older configs store an AddedToken as a dict
                eos = eos.get("content")
            if eos:
                return eos
        for token in _COMMON_EOD_TOKENS:
            if self._tokenizer.token_to_id(token) is not None:
                return token
        raise ValueError(f"{self.path} has no known end-of-document token; pass eod_token (--eod-token)")

    def identity(self) -> dict:
        """{"sha256" (of tokenizer.json's bytes), "vocab_size", "eod_id"}: equal exactly when two
        tokenizers give the same ids (a copy of the file elsewhere is the same tokenizer)."""
        digest = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        return {"sha256": digest, "vocab_size": self.vocab_size, "eod_id": self.eod_id}

    def encode(self, text: str) -> np.ndarray:
        """int32 ids [T] of `text`, without special tokens (no end-of-document id)."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        """Text of a sequence of ids; special tokens (the end-of-document one among them) are dropped."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def recorded_identity(info: dict) -> dict:
    """The tokenizer identity a dataset's lh_data.json (`info`) records; only its vocabulary size for data
    written before lh-data recorded the tokenizer's hash."""
    return info.get("tokenizer_identity") or {"vocab_size": info["vocab_size"]}


def identity_differences(identity: dict, reference: dict) -> list[str]:
    """"key value vs value" for the tokenizer.json hash and the vocabulary size, where both identities
    record them and they differ: empty when the ids mean the same. Which token ends a document is the
    data's choice (lh-data --eod-token), so it is not compared."""
    return [f"{k} {str(identity[k])[:12]} vs {str(reference[k])[:12]}" for k in ("sha256", "vocab_size")
            if k in identity and k in reference and identity[k] != reference[k]]


def load_tokenizer(spec: str = "byte", eod_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """`"byte"` gives the byte-level tokenizer; anything else is a path to a `tokenizer.json`, or to a
    Hugging Face folder holding one (its tokenizer_config.json then names the end-of-document token)."""
    if spec == "byte":
        if eod_token is not None:
            raise ValueError("eod_token applies only to a tokenizer.json, not to tokenizer 'byte'")
        return ByteTokenizer()
    if Path(spec).is_dir():
        if not (Path(spec) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer folder {spec} has no tokenizer.json")
        spec = str(Path(spec) / "tokenizer.json")
    return HFTokenizer(spec, eod_token=eod_token)
