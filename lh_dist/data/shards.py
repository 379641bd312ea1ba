"""Tokenize documents into mosaicml-streaming MDS shards with a validation split.

Layout of a dataset directory `OUT`:

    OUT/train/            MDS shards + index.json; one sample = one document's token ids
    OUT/train/doc_lengths.npy   token count of each sample, in sample order
    OUT/val/              the same for the validation split
    OUT/lh_data.json      tokenizer (its spec and identity: sha256, vocab_size, eod_id), vocab_size, eod_id,
                          token dtype, counts per split, source,
                          how validation was chosen, content_sha256 (of both splits' samples)

`doc_lengths.npy` lets a reader plan the packing of an epoch without opening
any shard. `lh_data.json` is written last: a directory without it is incomplete.
"""

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

# Inside a dataset being overwritten: the old dataset, until the new one is complete.
REPLACED = ".replaced"
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
        self.digest = hashlib.sha256()  # of each sample's length and token ids, as int64, in sample order
        self._writer = MDSWriter(
            out=str(directory),
            columns={"tokens": f"ndarray:{dtype}"},
            hashes=["sha1"],  # lets streaming check shards it downloads from a remote
            size_limit=shard_size,
        )

    def add(self, tokens: np.ndarray) -> None:
        self._writer.write({"tokens": tokens.astype(self.dtype)})
        self.digest.update(np.int64(len(tokens)).tobytes() + np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
        self.lengths.append(len(tokens))

    def finish(self) -> dict:
        self._writer.finish()
        np.save(self.directory / DOC_LENGTHS, np.asarray(self.lengths, dtype=np.int64))
        return {"documents": len(self.lengths), "tokens": int(sum(self.lengths))}


DEFAULT_VAL_TOKENS = 2_000_000


def write_dataset(
    documents: Iterable[tuple[str, str]] | Callable[[], Iterable[tuple[str, str]]],
    out: str | Path,
    tokenizer,
    *,
    source: str,
    val_tokens: int | None = None,
    val_fraction: float | None = None,
    min_doc_tokens: int = 1,
    max_docs: int | None = None,
    shard_size: int | str = "64mb",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize `(name, text)` documents into `out/train`, `out/val` and `out/lh_data.json`.

    The validation split is made of whole documents, chosen by `validation_score(name)`
    so that it does not depend on the order of the source:
    - `val_tokens=N` (the default, N = DEFAULT_VAL_TOKENS): documents in increasing
      score, each taken if the split stays within 2N tokens, until it holds N. This
      needs two passes over `documents` (a list, or a function returning a fresh iterator).
    - `val_fraction=f`: the documents with a score below f, or the lowest-scored one
      if none is; one pass.
    Documents shorter than `min_doc_tokens` are skipped; `max_docs` counts the kept
    ones. On any error, what this call wrote is removed, so a rerun can start afresh.
    Returns the metadata written to lh_data.json.
    """
    if val_tokens is not None and val_fraction is not None:
        raise ValueError("give val_tokens or val_fraction, not both")
    if val_fraction is None and val_tokens is None:
        val_tokens = DEFAULT_VAL_TOKENS
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if val_tokens is not None and val_tokens < 1:
        raise ValueError(f"val_tokens must be a positive integer, got {val_tokens}")
    if max_docs is not None and max_docs < 2:
        raise ValueError(f"max_docs must be >= 2 (one train and one val document), got {max_docs}")
    if min_doc_tokens < 1:
        raise ValueError(f"min_doc_tokens must be >= 1, got {min_doc_tokens}")
    with new_dataset(Path(out), overwrite) as out:
        return _write(documents, out, tokenizer, source, val_tokens, val_fraction, min_doc_tokens, max_docs,
                      shard_size, log)


@contextlib.contextmanager
def new_dataset(out: Path, overwrite: bool):
    """The folder of a dataset about to be written (checked; with overwrite, a dataset already there
    is set aside until the new one is complete). If writing fails, what was written is removed, the
    old dataset is put back, and the folder is removed if this call created it."""
    created, replaced = _prepare_output(out, overwrite)
    try:
        yield out
    except BaseException:
        _remove_dataset(out)
        if replaced is not None:
            _move_dataset(replaced, out)
            replaced.rmdir()
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    if replaced is not None:
        shutil.rmtree(replaced)


def _kept_documents(documents, tokenizer, min_doc_tokens, max_docs, log, what):
    """(name, tokens) of the documents kept, with progress on long corpora."""
    source = documents() if callable(documents) else documents
    kept = num_tokens = 0
    start = last_log = time.monotonic()
    for name, text in source:
        if max_docs is not None and kept >= max_docs:
            break
        tokens = tokenizer.encode(text)
        if len(tokens) < min_doc_tokens:
            continue
        kept += 1
        num_tokens += len(tokens)
        yield name, tokens
        if time.monotonic() - last_log > 5.0:
            last_log = time.monotonic()
            log(f"lh-data: {what}: {kept} documents, {num_tokens / 1e6:.1f}M tokens, {last_log - start:.0f}s")


def _validation_names(documents, tokenizer, val_tokens, min_doc_tokens, max_docs, log) -> set[str]:
    """Names of the documents that form a validation split of at least `val_tokens` tokens."""
    if not callable(documents) and iter(documents) is documents:
        raise TypeError("val_tokens needs two passes: pass a list or a function returning an iterator")
    lengths = {name: len(tokens) for name, tokens in
               _kept_documents(documents, tokenizer, min_doc_tokens, max_docs, log, "counting")}
    total = sum(lengths.values())
    if total < 2 * val_tokens:
        raise ValueError(f"the corpus has {total:,} tokens in {len(lengths)} documents, too few for "
                         f"{val_tokens:,} validation tokens (at most half goes to validation); "
                         f"lower --val-tokens")
    chosen, size = set(), 0
    for name in sorted(lengths, key=validation_score):
        if size + lengths[name] <= 2 * val_tokens:
            chosen.add(name)
            size += lengths[name]
            if size >= val_tokens:
                return chosen
    raise ValueError(f"no set of whole documents holds between {val_tokens:,} and {2 * val_tokens:,} tokens "
                     f"(the documents are too long); raise --val-tokens or make smaller documents")


def _write(documents, out, tokenizer, source, val_tokens, val_fraction, min_doc_tokens, max_docs, shard_size, log):
    start = time.monotonic()
    val_names = None
    if val_tokens is not None:
        val_names = _validation_names(documents, tokenizer, val_tokens, min_doc_tokens, max_docs, log)
    dtype = token_dtype(tokenizer.vocab_size)
    train = _SplitWriter(out / "train", dtype, shard_size)
    val = _SplitWriter(out / "val", dtype, shard_size)
    # Under val_fraction, the train document with the lowest score is held back, so
    # that it can go to validation at the end if no document scored below val_fraction.
    held: tuple[float, np.ndarray] | None = None
    num_docs = 0
    for name, tokens in _kept_documents(documents, tokenizer, min_doc_tokens, max_docs, log, "writing"):
        num_docs += 1
        if val_names is not None:
            (val if name in val_names else train).add(tokens)
            continue
        score = validation_score(name)
        if score < val_fraction:
            val.add(tokens)
        elif held is None or score < held[0]:
            if held is not None:
                train.add(held[1])
            held = (score, tokens)
        else:
            train.add(tokens)
    if num_docs < 2:
        raise ValueError(f"source {source!r} gave {num_docs} documents of at least {min_doc_tokens} tokens; "
                         "at least 2 are needed")
    if held is not None:
        (val if not val.lengths else train).add(held[1])
    if not train.lengths:
        raise ValueError(f"source {source!r}: every document went to validation; lower the validation size")

    info = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer.spec,
        "tokenizer_identity": tokenizer.identity(),
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "dtype": dtype,
        "source": source,
        "validation": {"val_tokens": val_tokens} if val_tokens is not None else {"val_fraction": val_fraction},
        "min_doc_tokens": min_doc_tokens,
        "splits": {"train": train.finish(), "val": val.finish()},
    }
    # Equal datasets have equal hashes, whatever their shard sizes.
    info["content_sha256"] = hashlib.sha256((train.digest.hexdigest() + val.digest.hexdigest()).encode()).hexdigest()
    (out / DATASET_INFO).write_text(json.dumps(info, indent=2) + "\n")
    splits = info["splits"]
    log(
        f"lh-data: wrote {out}: train {splits['train']['documents']} documents / "
        f"{splits['train']['tokens']:,} tokens, val {splits['val']['documents']} documents / "
        f"{splits['val']['tokens']:,} tokens, {time.monotonic() - start:.1f}s"
    )
    return info


def _remove_dataset(out: Path) -> None:
    """Remove only what this module writes, never unrelated files."""
    (out / DATASET_INFO).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)


def _move_dataset(source: Path, dest: Path) -> None:
    """Move what this module writes (and only that) from one folder to another on the same disk."""
    for name in (DATASET_INFO, *SPLITS):
        if (source / name).exists():
            (source / name).rename(dest / name)


def _prepare_output(out: Path, overwrite: bool) -> tuple[bool, Path | None]:
    """Make `out` ready to write: (whether this call created it, the folder inside it where a dataset
    being overwritten waits until the new one is complete, or None)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a directory")
    replaced = out / REPLACED
    if replaced.is_dir():  # an overwrite was killed: keep whichever dataset is complete
        if (out / DATASET_INFO).exists():
            shutil.rmtree(replaced)
        else:
            _remove_dataset(out)
            _move_dataset(replaced, out)
            replaced.rmdir()
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output {out} is not empty; pass --overwrite to replace it")
        replaced.mkdir()
        _move_dataset(out, replaced)
        return False, replaced
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created, None
