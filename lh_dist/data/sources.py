"""The datasets of a run: `data.path`, or the weighted sources of a mixture (`data.sources`).

`data_sources` reads every dataset's lh_data.json and checks them together before any work (a
missing folder, sources tokenized differently); `open_loaders` builds the train loader (a
`PackedLoader`, or a `MixtureLoader` over the sources) and one validation loader per source.

A checkpoint records each dataset's location and content hash (`data_identity`, lh_data.json's
content_sha256). `compare_data` tells a resume that a dataset was rebuilt in place: the saved data
position would then count samples of other documents.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath

from lh_dist.config import DataConfig
from lh_dist.data.loader import PackedLoader, read_dataset_info
from lh_dist.data.mixture import MixtureLoader
from lh_dist.errors import ConfigError


def data_location(path: str) -> str:
    """A dataset's identity for resume checks: the URL, or the resolved local path."""
    return path if "://" in path else os.path.realpath(path)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One dataset of the run and its lh_data.json."""

    key: str  # the config field that names it in messages: data.path, or data.sources[i] (name)
    name: str
    path: str
    weight: float
    info: dict  # empty where it was not read


def configured_sources(data: DataConfig) -> list[DataSource]:
    """The datasets as the config names them, their lh_data.json not read."""
    if not data.sources:
        return [DataSource("data.path", PurePosixPath(data.path.rstrip("/")).name, data.path, 1.0, {})]
    return [DataSource(f"data.sources[{i}] ({s.name})", s.name, s.path, s.weight, {})
            for i, s in enumerate(data.sources)]


def _tokenizer(info: dict) -> dict:
    # Datasets written before lh-data recorded the tokenizer's identity are told apart by spec and vocabulary.
    identity = info.get("tokenizer_identity")
    if identity:
        return {"sha256": identity["sha256"], "vocab_size": identity["vocab_size"]}
    return {"tokenizer": info.get("tokenizer", "byte"), "vocab_size": info["vocab_size"]}


def data_sources(data: DataConfig) -> list[DataSource]:
    """Every dataset of the config with its lh_data.json. ConfigError (one line, naming the source) for
    a missing folder, an unreadable lh_data.json, or sources tokenized with different tokenizers.

    Which token ends a document is each dataset's choice (lh-data --eod-token), so it is not compared."""
    sources = []
    for source in configured_sources(data):
        if "://" not in source.path and not Path(source.path).is_dir():
            raise ConfigError(f"{source.key}: dataset folder {source.path} does not exist (write it with lh-data)")
        try:
            info = read_dataset_info(source.path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{source.key}: {e}") from None
        sources.append(dataclasses.replace(source, info=info))
    first = _tokenizer(sources[0].info)
    for source in sources[1:]:
        mine = _tokenizer(source.info)
        if mine != first:
            differ = ", ".join(f"{k} {str(mine.get(k))[:12]} vs {str(first.get(k))[:12]}" for k in first
                               if mine.get(k) != first[k])
            raise ConfigError(f"{source.key}: {source.path} was tokenized with another tokenizer than "
                              f"{sources[0].key} {sources[0].path} ({differ}); the sources of a mixture share one "
                              f"tokenizer (lh-data --tokenizer)")
    return sources


def _open(source: DataSource, split: str, **kwargs) -> PackedLoader:
    try:
        return PackedLoader(source.path, split, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{source.key}: {e}") from None


def open_loaders(data: DataConfig, sources: list[DataSource], *, eval_batches: int, dp_rank: int, dp_degree: int,
                 seed: int, cache_dir: str) -> tuple[PackedLoader | MixtureLoader, dict[str, PackedLoader]]:
    """(train loader, {source name: validation loader of at most eval_batches batches}).

    With data.path the train loader is that dataset's `PackedLoader`, as it always was; with
    data.sources a `MixtureLoader` over the sources' train splits. Each source of a mixture
    caches a remote dataset in its own folder, <cache_dir>/<name>."""
    args = dict(seq_len=data.seq_len, micro_batch=data.micro_batch, dp_rank=dp_rank, dp_degree=dp_degree, seed=seed)
    caches = {s.name: os.path.join(cache_dir, s.name) if data.sources else cache_dir for s in sources}
    train = {s.name: _open(s, "train", cache_dir=caches[s.name], **args) for s in sources}
    val = {s.name: _open(s, "val", max_batches=eval_batches, cache_dir=caches[s.name], **args) for s in sources}
    if not data.sources:
        return next(iter(train.values())), val
    weights = {s.name: s.weight for s in sources}
    return MixtureLoader(train, weights, micro_batch=data.micro_batch, dp_rank=dp_rank, dp_degree=dp_degree,
                         seed=seed), val


# ---- identity on resume ----------------------------------------------------------------------

def data_identity(data: DataConfig, sources: list[DataSource] | None = None) -> dict:
    """What a checkpoint records of its data besides the loader's position: with data.path
    {"path", "content_sha256"}; with data.sources {"datasets": {name: {"path", "content_sha256"}}}.
    Without `sources` (lh_data.json not read) the content hashes are None."""
    entries = {s.name: {"path": data_location(s.path), "content_sha256": s.info.get("content_sha256")}
               for s in (sources if sources is not None else configured_sources(data))}
    return next(iter(entries.values())) if not data.sources else {"datasets": entries}


@dataclasses.dataclass
class DataComparison:
    """How the data of a resumed run relates to what its checkpoint recorded."""

    moved: list[str]  # another dataset location or another set of sources: resume refuses
    changed: list[str]  # same location, other content (rebuilt in place): refused unless accepted
    unrecorded: list[str]  # the checkpoint has no content hash (written by an older lh_dist)


def _recorded(record: dict) -> dict[str, dict]:
    """{label: {"path", "content_sha256", "documents"}} of a checkpoint's data record."""
    if "datasets" in record:
        return {f"data.sources {name}": dict(entry, documents=record["sources"][name]["num_documents"])
                for name, entry in record["datasets"].items()}
    return {"data.path": {"path": record["path"], "content_sha256": record.get("content_sha256"),
                          "documents": record.get("num_documents")}}


def _what(entries: dict) -> str:
    names = [k.removeprefix("data.sources ") for k in entries if k != "data.path"]
    return f"data.sources [{', '.join(names)}]" if names else "data.path"


def compare_data(record: dict, data: DataConfig, sources: list[DataSource]) -> DataComparison:
    """Compare a checkpoint's data record (its manifest's "data") with the run's datasets.

    Content is compared by content_sha256; where the checkpoint has none, by the train split's
    document count (a rebuilt dataset that kept its count then passes, listed as unrecorded).
    Sources whose lh_data.json was not read (`configured_sources`) are compared by location only."""
    old = _recorded(record)
    new = {("data.path" if not data.sources else f"data.sources {s.name}"): s for s in sources}
    if set(old) != set(new):
        return DataComparison([f"{_what(old)} -> {_what(new)}"], [], [])
    moved, changed, unrecorded = [], [], []
    if list(old) != list(new):
        # Each sample's source is drawn as an index into the list (`mixture.source_draws`): another order
        # draws other sources from the same position on.
        moved.append(f"the order {_what(old)} -> {_what(new)} (samples draw their source by position in the list)")
    for label, source in new.items():
        was, location = old[label], data_location(source.path)
        if was["path"] != location:
            moved.append(f"{label} {was['path']!r} -> {location!r}")
            continue
        if not source.info:
            continue
        content = source.info.get("content_sha256")
        documents = source.info["splits"]["train"]["documents"]
        if was["content_sha256"] and content:
            if was["content_sha256"] != content:
                changed.append(f"{label} {source.path} (content_sha256 {was['content_sha256'][:12]} -> {content[:12]})")
        elif was["documents"] is not None and was["documents"] != documents:
            changed.append(f"{label} {source.path} (train documents {was['documents']} -> {documents})")
        else:
            unrecorded.append(f"{label} {source.path}")
    return DataComparison(moved, changed, unrecorded)


def with_current_documents(saved: dict, current: dict) -> dict:
    """A saved loader state made loadable over rebuilt datasets (lh-train --accept-changed-data): the
    sample counters are kept, the document counts become the current loader's (`current`, its state)."""
    out = dict(saved)
    if "sources" in current:
        out["sources"] = {name: dict(saved["sources"][name], num_documents=now["num_documents"])
                          for name, now in current["sources"].items()}
    else:
        out["num_documents"] = current["num_documents"]
    return out
