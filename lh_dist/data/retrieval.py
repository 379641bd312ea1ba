"""Long-range retrieval documents: key/value statements and later look-ups, hidden in real text.

A document of exactly `length` tokens is filler (a window of another lh-data dataset's
token stream) with `keys` statements and `queries` queries inserted between its
tokens. In token space each is the concatenation of separately encoded pieces:

    statement:  \\nkeys["kv-3f9a2c"] = "481516"\\n
    query:      \\nassert keys["kv-3f9a2c"] == "481516"\\n      (query_form "assert")
                \\nkeys["kv-3f9a2c"] = "481516"\\n             (query_form "restate")

Encoding piece by piece makes the key and the value the same token ids in a statement and
in its query, whatever the tokenizer merges; the pieces are cut at places where byte-level
BPE pre-tokenizers (GPT-2's, Llama 3's, digit-splitting ones) cut anyway, so for those the
ids also equal the encoding of the whole text (`template_is_canonical` checks a tokenizer).
A restated query repeats its statement token for token, so that copying answers it.
The first `queries` keys are queried, `queries_per_key` times each; the others are distractors,
stated and never asked. A query comes after its statement, the filler tokens between them (the
gap) drawn log-uniformly from [min_gap, filler length], so that every octave of distance, the
longest included, holds as many queries; a key's several gaps are drawn alike and sorted, so
that each of its later queries also follows an earlier, nearer query of the key. Distances are
still measured from the statement. Statements of distractors sit uniformly at random.
Each item then moves to the nearest line start of the filler within MAX_SNAP tokens
(statements back, queries forward: gaps only grow), so that it reads as a line of code.

Everything is a function of (seed, split, length, index): document `index` of a split is
the same whoever builds it, at whatever point, and the val split's stream is disjoint from
train's. The train split's filler comes from the filler dataset's train split and the val
split's from its val split, so held-out documents share no filler with training ones.
Filler windows read across the filler's document boundaries; its end-of-document tokens
become newlines, so that a retrieval document is one document to the packed loader.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lh_dist.data.loader import PackedLoader, read_dataset_info
from lh_dist.data.shards import DATASET_INFO, FORMAT_VERSION, SPLITS, _SplitWriter, new_dataset
from lh_dist.data.tokenizer import load_tokenizer

STATEMENT = ('\nkeys["', "{key}", '"] = "', "{value}", '"\n')
QUERY = ('\nassert keys["', "{key}", '"] == "', "{value}", '"\n')
# The templates of a query, by RetrievalSettings.query_form.
QUERY_FORMS = {"assert": QUERY, "restate": STATEMENT}
KEY_PREFIX = "kv-"
KEY_HEX_DIGITS = 6
# Seed streams of the splits: a document's generator is seeded with [seed, stream, length, index].
SPLIT_STREAMS = {"train": 0, "val": 1}
# The filler stream is read in packed chunks of this many tokens (the loader's seq_len + 1).
FILLER_CHUNK = 4096
RETRIEVAL_VERSION = 1
# Farthest an item moves to reach a line start of the filler.
MAX_SNAP = 256


@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
    """What a retrieval document is made of; recorded under "retrieval" in lh_data.json."""

    doc_tokens: int
    """Tokens per document of the dataset (evaluation may build other lengths)."""
    keys: int = 32
    """Statements per document, queried or not."""
    queries: int = 16
    """Keys queried per document; keys - queries are distractors."""
    min_gap: int = 64
    """Fewest filler tokens between a statement and its query."""
    value_digits: int = 6
    """Decimal digits of a value."""
    seed: int = 0
    query_form: str = "assert"
    """How a query reads: "assert" (`assert keys[k] == v`) or "restate" (its statement again)."""
    queries_per_key: int = 1
    """Queries of each queried key, at independently drawn distances from its statement."""

    def __post_init__(self):
        for name in ("doc_tokens", "keys", "queries", "min_gap", "value_digits", "queries_per_key"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.queries > self.keys:
            raise ValueError(f"queries must not exceed keys (one query per key), got {self.queries} > {self.keys}")
        if self.value_digits > 18:
            raise ValueError(f"value_digits must be at most 18, got {self.value_digits}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.query_form not in QUERY_FORMS:
            raise ValueError(f"query_form must be one of {', '.join(QUERY_FORMS)}, got {self.query_form!r}")

    @property
    def query_pieces(self) -> tuple[str, ...]:
        """The template of a query of this form."""
        return QUERY_FORMS[self.query_form]

    @property
    def num_queries(self) -> int:
        """Queries per document: queries * queries_per_key."""
        return self.queries * self.queries_per_key

    @classmethod
    def from_info(cls, info: dict) -> RetrievalSettings:
        """The settings of a dataset's lh_data.json; ValueError if lh-data retrieval did not write it."""
        if "retrieval" not in info:
            raise ValueError("the dataset was not written by lh-data retrieval (its lh_data.json has no "
                             "'retrieval' section)")
        recorded = info["retrieval"]
        if recorded.get("version") != RETRIEVAL_VERSION:
            raise ValueError(f"the dataset's retrieval version is {recorded.get('version')!r}; this lh_dist "
                             f"builds version {RETRIEVAL_VERSION} (rebuild it with lh-data retrieval)")
        # Fields added since (query_form, queries_per_key) are absent from older datasets, whose
        # documents are the ones their defaults build.
        return cls(**{f.name: recorded[f.name] for f in dataclasses.fields(cls) if f.name in recorded})


@dataclasses.dataclass(frozen=True)
class Statement:
    """One key/value statement; `start` is the token index of its first token."""

    key: str
    value: str
    start: int
    value_start: int
    queried: bool


@dataclasses.dataclass(frozen=True)
class Query:
    """One look-up: the value's tokens are `answer` = tokens[answer_start : answer_start + len(answer)]."""

    key: str
    value: str
    start: int
    answer_start: int
    answer: tuple[int, ...]
    statement_start: int

    @property
    def distance(self) -> int:
        """Tokens from the first token of the statement to the first token of the query."""
        return self.start - self.statement_start


@dataclasses.dataclass(frozen=True)
class RetrievalDocument:
    """A document's token ids, its statements in document order and its queries in document order."""

    tokens: np.ndarray  # int64 [length]
    statements: list[Statement]
    queries: list[Query]


def encode_item(tokenizer, pieces: tuple[str, ...], key: str, value: str) -> tuple[list[int], int, int]:
    """(ids, offset of the value's first id, number of value ids) of a statement or query."""
    ids: list[int] = []
    value_at = value_len = 0
    for piece in pieces:
        encoded = tokenizer.encode(key if piece == "{key}" else value if piece == "{value}" else piece).tolist()
        if piece == "{value}":
            value_at, value_len = len(ids), len(encoded)
        ids += encoded
    return ids, value_at, value_len


def template_is_canonical(tokenizer, key: str = "kv-3f9a2c", value: str = "481516") -> bool:
    """Whether the piecewise ids of a statement and a query equal the tokenizer's ids of their text."""
    for pieces in (STATEMENT, QUERY):
        text = "".join(key if p == "{key}" else value if p == "{value}" else p for p in pieces)
        if encode_item(tokenizer, pieces, key, value)[0] != tokenizer.encode(text).tolist():
            return False
    return True


def min_document_length(settings: RetrievalSettings, tokenizer) -> int:
    """Tokens of the statements, queries and one minimal gap: the shortest document length, as
    estimated with a sample key (a tokenizer that encodes some keys longer needs a few more)."""
    key, value = KEY_PREFIX + "f" * KEY_HEX_DIGITS, "9" * settings.value_digits
    statement = len(encode_item(tokenizer, STATEMENT, key, value)[0])
    query = len(encode_item(tokenizer, settings.query_pieces, key, value)[0])
    return settings.keys * statement + settings.num_queries * query + settings.min_gap


class FillerStream:
    """Token windows of one split of an lh-data dataset read as a single text: its documents in
    stored order (val) or in the loader's seeded order (train), each end-of-document token
    replaced by `newline_id`."""

    def __init__(self, path: str | Path, split: str, newline_id: int, seed: int = 0):
        info = read_dataset_info(str(path))
        tokens = info["splits"][split]["tokens"] + info["splits"][split]["documents"]  # with eod tokens
        if tokens < FILLER_CHUNK:
            raise ValueError(f"filler {path} split {split!r} has {tokens:,} tokens; at least "
                             f"{FILLER_CHUNK:,} are needed")
        self.path, self.split = str(path), split
        self.eod_id, self.newline_id = int(info["eod_id"]), newline_id
        self._loader = PackedLoader(self.path, split, seq_len=FILLER_CHUNK - 1, micro_batch=1, dp_rank=0,
                                    dp_degree=1, seed=seed)
        self.num_tokens = self._loader.samples_per_epoch * FILLER_CHUNK  # the last partial chunk is dropped

    def window(self, start: int, num_tokens: int) -> np.ndarray:
        """int64 [num_tokens]: stream tokens [start, start + num_tokens)."""
        if not (0 <= start and start + num_tokens <= self.num_tokens):
            raise ValueError(f"window [{start}, {start + num_tokens}) outside the filler's {self.num_tokens} tokens")
        if num_tokens == 0:
            return np.zeros(0, dtype=np.int64)
        first, last = start // FILLER_CHUNK, (start + num_tokens - 1) // FILLER_CHUNK
        chunks = np.concatenate([self._loader.packed_sample(j) for j in range(first, last + 1)])
        window = chunks[start - first * FILLER_CHUNK:][:num_tokens].copy()
        window[window == self.eod_id] = self.newline_id
        return window

    def close(self) -> None:
        """Release the dataset's shared memory."""
        self._loader.close()


class RetrievalGenerator:
    """Builds the documents of one split: `document(index, length)`."""

    def __init__(self, settings: RetrievalSettings, filler: str | Path, split: str, tokenizer=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.settings, self.split = settings, split
        filler_info = read_dataset_info(str(filler))
        self.tokenizer = tokenizer or load_tokenizer(filler_info.get("tokenizer", "byte"))
        newline = self.tokenizer.encode("\n")
        if len(newline) != 1:
            raise ValueError(f"tokenizer {self.tokenizer.spec!r} encodes a newline as {len(newline)} tokens; "
                             "the filler's document boundaries need one")
        self.filler = FillerStream(filler, split, int(newline[0]), seed=settings.seed)

    @functools.cached_property
    def _line_ends(self) -> np.ndarray:
        """bool [vocab_size]: whether a token's text ends with a newline."""
        return np.array([self.tokenizer.decode([i]).endswith("\n") for i in range(self.tokenizer.vocab_size)])

    def min_length(self) -> int:
        """Shortest document this generator can build (`min_document_length`)."""
        return min_document_length(self.settings, self.tokenizer)

    def check_length(self, length: int) -> None:
        """Raise ValueError if documents of `length` tokens cannot be built (too short for the
        statements and queries by the estimate of `min_length`, or longer than the filler)."""
        self._check_fits(length, needed=self.min_length(), filler=length)

    def _check_fits(self, length: int, needed: int, filler: int) -> None:
        """ValueError if a `length`-token document needs more than it has (`needed` tokens in all) or
        more filler than this split holds (`filler` tokens)."""
        s = self.settings
        if length < needed:
            raise ValueError(f"a document of {length:,} tokens cannot hold {s.keys} statements, {s.num_queries} "
                             f"queries and a gap of {s.min_gap} tokens (at least {needed:,} tokens are needed)")
        if filler > self.filler.num_tokens:
            raise ValueError(f"filler {self.filler.path} split {self.split!r} has {self.filler.num_tokens:,} "
                             f"tokens, fewer than the {filler:,} that a {length:,}-token document needs")

    def document(self, index: int, length: int | None = None) -> RetrievalDocument:
        """Document `index` of this split, `length` tokens long (default: settings.doc_tokens)."""
        s = self.settings
        length = length or s.doc_tokens
        rng = np.random.default_rng([s.seed, SPLIT_STREAMS[self.split], length, index])
        keys = _distinct_keys(rng, s.keys)
        values = ["".join(map(str, digits)) for digits in rng.integers(0, 10, size=(s.keys, s.value_digits))]
        statements = [encode_item(self.tokenizer, STATEMENT, k, v) for k, v in zip(keys, values)]
        queries = [encode_item(self.tokenizer, s.query_pieces, k, v) for k, v in zip(keys[:s.queries], values)]
        num_filler = length - sum(len(ids) for ids, _, _ in statements) - s.queries_per_key * sum(
            len(ids) for ids, _, _ in queries)
        self._check_fits(length, needed=length - num_filler + s.min_gap, filler=num_filler)

        # Offsets into the filler: an item at offset a goes between filler tokens a - 1 and a.
        # The draws of one query per key are those of [queries] gaps, so such documents stay as they were.
        gaps = np.exp(rng.uniform(math.log(s.min_gap), math.log(num_filler + 1),
                                  size=(s.queries, s.queries_per_key)))
        gaps = np.sort(np.minimum(gaps.astype(np.int64), num_filler), axis=1)  # [queries, queries_per_key]
        statement_at = rng.integers(0, num_filler + 1, size=s.keys)
        statement_at[:s.queries] = rng.integers(0, num_filler - gaps[:, -1] + 1)
        window = self.filler.window(int(rng.integers(0, self.filler.num_tokens - num_filler + 1)), num_filler)
        # The ends of the window count as line starts: its first and last lines may be cut.
        line_starts = np.unique(np.concatenate([[0], np.flatnonzero(self._line_ends[window]) + 1, [num_filler]]))
        query_at = _snap(line_starts, (statement_at[:s.queries, None] + gaps).ravel(), forward=True)
        statement_at = _snap(line_starts, statement_at, forward=False)

        # At equal offsets statements come first, then queries, each in key order; query j is about key
        # j // queries_per_key.
        items = sorted([(int(a), 0, i) for i, a in enumerate(statement_at)] +
                       [(int(a), 1, j // s.queries_per_key) for j, a in enumerate(query_at)])
        pieces, filled, position = [], 0, 0
        found_statements: dict[int, Statement] = {}
        found_queries = []
        for offset, kind, i in items:
            pieces.append(window[filled:offset])
            position += offset - filled
            filled = offset
            ids, value_at, value_len = (statements if kind == 0 else queries)[i]
            if kind == 0:
                found_statements[i] = Statement(keys[i], values[i], position, position + value_at,
                                                i < s.queries)
            else:
                found_queries.append(Query(keys[i], values[i], position, position + value_at,
                                           tuple(ids[value_at:value_at + value_len]), found_statements[i].start))
            pieces.append(np.asarray(ids, dtype=np.int64))
            position += len(ids)
        pieces.append(window[filled:])
        tokens = np.concatenate(pieces)
        assert len(tokens) == length
        return RetrievalDocument(tokens, sorted(found_statements.values(), key=lambda st: st.start), found_queries)

    def close(self) -> None:
        """Release the filler dataset."""
        self.filler.close()


def _snap(line_starts: np.ndarray, offsets: np.ndarray, forward: bool) -> np.ndarray:
    """Each offset moved to the nearest line start after it (forward) or at or before it (back),
    if one lies within MAX_SNAP tokens; else left where it is."""
    if forward:
        i = np.minimum(np.searchsorted(line_starts, offsets, side="left"), len(line_starts) - 1)
    else:
        i = np.maximum(np.searchsorted(line_starts, offsets, side="right") - 1, 0)
    snapped = line_starts[i]
    near = (snapped >= offsets) if forward else (snapped <= offsets)
    return np.where(near & (np.abs(snapped - offsets) <= MAX_SNAP), snapped, offsets)


def _distinct_keys(rng: np.random.Generator, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = f"{KEY_PREFIX}{int(rng.integers(0, 16 ** KEY_HEX_DIGITS)):0{KEY_HEX_DIGITS}x}"
        if key not in keys:
            keys.append(key)
    return keys


def write_retrieval_dataset(
    out: str | Path,
    filler: str | Path,
    settings: RetrievalSettings,
    *,
    train_docs: int,
    val_docs: int,
    shard_size: int | str = "64mb",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Write `train_docs` and `val_docs` retrieval documents of settings.doc_tokens tokens into
    `out/train`, `out/val` and `out/lh_data.json`, filler from the lh-data dataset `filler`.

    lh_data.json is an ordinary lh-data record (the filler's tokenizer) plus "retrieval": the
    settings, the templates and the filler (its path and content_sha256), from which evaluation
    rebuilds any document. On an error, what this call wrote is removed. Returns the record.
    """
    for name, count in (("train_docs", train_docs), ("val_docs", val_docs)):
        if count < 1:
            raise ValueError(f"{name} must be a positive integer, got {count}")
    filler = Path(filler).resolve()
    if not filler.is_dir():
        raise FileNotFoundError(f"filler dataset not found: {filler} (a local lh-data directory)")
    filler_info = read_dataset_info(str(filler))
    generators = {}
    try:
        for split in SPLITS:
            generators[split] = RetrievalGenerator(settings, filler, split)
            generators[split].check_length(settings.doc_tokens)
        tokenizer = generators["train"].tokenizer
        if not template_is_canonical(tokenizer):
            log(f"lh-data: warning: tokenizer {tokenizer.spec!r} merges across the template's pieces; the "
                "documents hold the piecewise ids, which differ from the ids of their text")
        with new_dataset(Path(out), overwrite) as out:
            return _write(out, filler, filler_info, settings, generators, {"train": train_docs, "val": val_docs},
                          shard_size, log)
    finally:
        for generator in generators.values():
            generator.close()


def _write(out, filler, filler_info, settings, generators, counts, shard_size, log) -> dict:
    start = last_log = time.monotonic()
    dtype = filler_info["dtype"]
    writers = {split: _SplitWriter(out / split, dtype, shard_size) for split in SPLITS}
    total, done = sum(counts.values()), 0
    for split in SPLITS:
        for index in range(counts[split]):
            writers[split].add(generators[split].document(index).tokens)
            done += 1
            if time.monotonic() - last_log > 5.0:
                last_log = time.monotonic()
                log(f"lh-data: retrieval: {done}/{total} documents ({split}), "
                    f"{done * settings.doc_tokens / 1e6:.1f}M tokens, {last_log - start:.0f}s")
    splits = {split: writers[split].finish() for split in SPLITS}
    info = {
        "format_version": FORMAT_VERSION,
        "tokenizer": filler_info.get("tokenizer", "byte"),
        "vocab_size": filler_info["vocab_size"],
        "eod_id": filler_info["eod_id"],
        "dtype": dtype,
        # The filler's tokenizer is this dataset's: lh-train compares it with an imported model's.
        **({"tokenizer_identity": filler_info["tokenizer_identity"]} if "tokenizer_identity" in filler_info else {}),
        "source": f"retrieval:{filler}",
        "validation": {"documents": counts["val"]},
        "min_doc_tokens": settings.doc_tokens,
        "splits": splits,
        # As lh-data's other sources: equal datasets have equal hashes, whatever their shard sizes.
        "content_sha256": hashlib.sha256((writers["train"].digest.hexdigest()
                                          + writers["val"].digest.hexdigest()).encode()).hexdigest(),
        "retrieval": dataclasses.asdict(settings) | {
            "version": RETRIEVAL_VERSION, "statement": "".join(STATEMENT), "query": "".join(settings.query_pieces),
            "filler": str(filler), "filler_content_sha256": filler_info.get("content_sha256")},
    }
    (out / DATASET_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log(f"lh-data: wrote {out}: train {counts['train']} / val {counts['val']} documents of "
        f"{settings.doc_tokens:,} tokens ({settings.keys} keys, {settings.num_queries} queries each), "
        f"{time.monotonic() - start:.1f}s")
    return info


def dataset_generator(data: str | Path, split: str = "val", filler: str | Path | None = None) -> RetrievalGenerator:
    """The generator of a retrieval dataset's split, from its lh_data.json; `filler` replaces the
    recorded filler path (a moved copy: its content must be the recorded one)."""
    info = read_dataset_info(str(data))
    try:
        settings = RetrievalSettings.from_info(info)
    except ValueError as e:
        raise ValueError(f"{data}: {e}") from None
    filler = filler or info["retrieval"]["filler"]
    recorded = info["retrieval"].get("filler_content_sha256")
    try:
        found = read_dataset_info(str(filler)).get("content_sha256")
    except FileNotFoundError:
        raise FileNotFoundError(f"the filler corpus of {data}, {filler}, is not there: moved? pass its place "
                                f"(--filler)") from None
    if recorded and found != recorded:
        raise ValueError(f"filler {filler} is not the one {data} was built from (content_sha256 {found}, "
                         f"recorded {recorded})")
    return RetrievalGenerator(settings, filler, split)
