"""Tokenize documents into mosaicml-streaming MDS shards with a validation split.

Layout of a dataset directory `OUT`:

    OUT/train/            MDS shards + index.json; one sample = one document's token ids
    OUT/train/doc_lengths.npy   token count of each sample, in sample order
    OUT/val/              the same for the validation split
    OUT/lh_data.json      tokenizer, vocab_size, eod_id, token dtype, counts per split, source

`doc_lengths.npy` lets a reader plan the packing of an epoch without opening
any shard. `lh_data.json` is written last: a directory without it is incomplete.
"""

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

DATASET_INFO = "lh_data.json"
DOC_LENGTHS = "doc_lengths.npy"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> str:
    """Smallest numpy dtype (name) that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def validation_score(name: str) -> float:
    """A document's position in [0, 1), fixed by its name; below val_fraction means validation."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class _SplitWriter:
    def __init__(self, directory: Path, dtype: str, shard_size: int | str):
        from streaming import MDSWriter  # importing streaming takes seconds

        self.directory = directory
        self.dtype = dtype
        self.lengths: list[int] = []
        self._writer = MDSWriter(
            out=str(directory),
            columns={"tokens": f"ndarray:{dtype}"},
            hashes=["sha1"],  # lets streaming check shards it downloads from a remote
            size_limit=shard_size,
        )

    def add(self, tokens: np.ndarray) -> None:
        self._writer.write({"tokens": tokens.astype(self.dtype)})
        self.lengths.append(len(tokens))

    def finish(self) -> dict:
        self._writer.finish()
        np.save(self.directory / DOC_LENGTHS, np.asarray(self.lengths, dtype=np.int64))
        return {"documents": len(self.lengths), "tokens": int(sum(self.lengths))}


def write_dataset(
    documents: Iterable[tuple[str, str]],
    out: str | Path,
    tokenizer,
    *,
    source: str,
    val_fraction: float = 0.01,
    max_docs: int | None = None,
    shard_size: int | str = "64mb",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize `(name, text)` documents into `out/train`, `out/val` and `out/lh_data.json`.

    A document goes to validation when `validation_score(name) < val_fraction`;
    if none does, the document with the lowest score does, so validation is never
    empty. Empty documents are skipped. Returns the metadata written to lh_data.json.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_docs is not None and max_docs < 2:
        raise ValueError(f"max_docs must be >= 2 (one train and one val document), got {max_docs}")
    out = Path(out)
    _prepare_output(out, overwrite)

    dtype = token_dtype(tokenizer.vocab_size)
    train = _SplitWriter(out / "train", dtype, shard_size)
    val = _SplitWriter(out / "val", dtype, shard_size)
    # The train document with the lowest score is held back, so that it can go to
    # validation at the end if no document scored below val_fraction.
    held: tuple[float, np.ndarray] | None = None
    num_docs = num_tokens = 0
    start = last_log = time.monotonic()
    for name, text in documents:
        if max_docs is not None and num_docs >= max_docs:
            break
        tokens = tokenizer.encode(text)
        if len(tokens) == 0:
            continue
        num_docs += 1
        num_tokens += len(tokens)
        score = validation_score(name)
        if score < val_fraction:
            val.add(tokens)
        elif held is None or score < held[0]:
            if held is not None:
                train.add(held[1])
            held = (score, tokens)
        else:
            train.add(tokens)
        if time.monotonic() - last_log > 5.0:
            last_log = time.monotonic()
            log(f"lh-data: {num_docs} documents, {num_tokens / 1e6:.1f}M tokens, {last_log - start:.0f}s")
    if num_docs < 2:
        raise ValueError(f"source {source!r} gave {num_docs} non-empty documents; at least 2 are needed")
    (val if not val.lengths else train).add(held[1])

    info = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer.spec,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "dtype": dtype,
        "source": source,
        "val_fraction": val_fraction,
        "splits": {"train": train.finish(), "val": val.finish()},
    }
    (out / DATASET_INFO).write_text(json.dumps(info, indent=2) + "\n")
    splits = info["splits"]
    log(
        f"lh-data: wrote {out}: train {splits['train']['documents']} documents / "
        f"{splits['train']['tokens']} tokens, val {splits['val']['documents']} documents / "
        f"{splits['val']['tokens']} tokens, {time.monotonic() - start:.1f}s"
    )
    return info


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output {out} is not empty; pass overwrite=True (--overwrite) to replace it")
        # Remove only what this module writes, never unrelated files.
        (out / DATASET_INFO).unlink(missing_ok=True)
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
