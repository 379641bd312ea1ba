"""Packed fixed-length training samples read from MDS shards.

The token stream of an epoch is every document of the split, in an order
shuffled by (seed, epoch), each followed by the end-of-document token. Global
sample j of the epoch is tokens [j*(seq_len+1), (j+1)*(seq_len+1)) of that stream;
the tail that does not fill a sample is dropped. Batch b of data-parallel rank r
holds global samples (b*dp_degree + r)*micro_batch + i, i < micro_batch, counted
across epochs. A batch is thus a pure function of (seed, b, dp_rank): the ranks of
a context-parallel group (same dp_rank) get the same samples, resume needs only b,
and ranks never talk to each other while iterating.

Documents are read by index through mosaicml-streaming's `StreamingDataset`, which
downloads and caches shards of a remote dataset (checking their sha1). A local
dataset is read in place, each shard checked against the size (when the loader
opens) and the sha1 (when the shard is first read) that index.json records. Its own
sampler (and its `replication` argument) is not used: it partitions documents, not packed samples,
so ranks would pack different numbers of documents per batch and a single
resume position would not exist.
"""

import atexit
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lh_dist.data.shards import DATASET_INFO, DOC_LENGTHS, FORMAT_VERSION, SPLITS
from lh_dist.data.streaming_shm import open_streaming_dataset


class CorruptDataError(ValueError):
    """A dataset file does not match what lh-data recorded for it."""


def _is_remote(path: str) -> bool:
    return "://" in str(path)


def relative_note(path: str) -> str:
    """For a missing dataset: " (a relative path, read from <cwd>)" where `path` is local and relative,
    since a run's data.path is relative to where it was trained; else ""."""
    if _is_remote(path) or Path(path).is_absolute():
        return ""
    return f" (a relative path, read from {Path.cwd()})"


def _streaming_remote(url: str) -> str:
    """The remote as streaming names it: streaming reads a file:// location as a plain path."""
    return url[len("file://") :] if url.startswith("file://") else url


def _download(url: str, local: str) -> None:
    from streaming.base.storage import CloudDownloader  # importing streaming takes seconds

    # Several ranks may fetch the same file: each writes its own temporary file,
    # then renames it into place atomically.
    tmp = f"{local}.{os.getpid()}.tmp"
    CloudDownloader.direct_download(_streaming_remote(url), tmp)
    os.replace(tmp, local)


def read_dataset_info(path: str) -> dict:
    """Read `lh_data.json` of a dataset: a local directory or any remote URL streaming supports."""
    location = f"{str(path).rstrip('/')}/{DATASET_INFO}"
    try:
        if _is_remote(path):
            with tempfile.TemporaryDirectory() as tmp:
                _download(location, os.path.join(tmp, DATASET_INFO))
                text = Path(tmp, DATASET_INFO).read_text()
        else:
            text = Path(location).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset info not found: {location}{relative_note(path)}; write datasets with "
                                f"lh-data") from None
    try:
        info = json.loads(text)
        missing = {"format_version", "vocab_size", "eod_id", "dtype", "splits"} - set(info)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"corrupt dataset info {location}: {e}") from None
    if missing:
        raise ValueError(f"corrupt dataset info {location}: missing keys {sorted(missing)}")
    if info["format_version"] != FORMAT_VERSION:
        raise ValueError(f"dataset info {location} has format_version {info['format_version']!r}; this lh_dist "
                         f"reads format_version {FORMAT_VERSION} only (rebuild the dataset with lh-data)")
    return info


class PackedLoader:
    """Iterator of LongTensor `[micro_batch, seq_len + 1]`: inputs `x[:, :-1]`, targets `x[:, 1:]`.

    `split="train"` repeats forever, reshuffling documents every epoch.
    `split="val"` is finite: one pass in stored order over the batches that every
    rank can fill (`num_batches`, at most `max_batches`); each `iter()` restarts it.
    `path` is a local directory, read in place (`cache_dir` is then unused), or a
    URL streaming supports (s3://, gs://, oci://, hf://, ...), whose shards are
    downloaded into `cache_dir` as needed. A `file://` URL is copied the same way,
    e.g. from a slow shared filesystem to a local disk.
    The ranks of a CP group share a dp_rank and so get the same samples.
    Every rank of the job must build its loaders together (streaming
    coordinates the processes of a node while opening a dataset).
    """

    def __init__(
        self,
        path: str,
        split: str,
        *,
        seq_len: int,
        micro_batch: int,
        dp_rank: int,
        dp_degree: int,
        seed: int,
        cache_dir: str | None = None,
        max_batches: int | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        sizes = {"seq_len": seq_len, "micro_batch": micro_batch, "dp_degree": dp_degree}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank must be in [0, {dp_degree}), got {dp_rank}")
        if max_batches is not None and max_batches < 0:
            raise ValueError(f"max_batches must be >= 0, got {max_batches}")
        if _is_remote(path) and cache_dir is None:
            raise ValueError(f"cache_dir is required to read the remote dataset {path}")

        self.path, self.split, self.seed = str(path), split, seed
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.info = read_dataset_info(self.path)
        self.eod_id = int(self.info["eod_id"])
        cache_dir = cache_dir if _is_remote(path) else None
        self._shard_sha1: dict[str, str | None] = {}
        self._dataset = self._open_dataset(cache_dir)
        self._lengths = self._read_lengths(cache_dir)
        if len(self._lengths) != self._dataset.num_samples:
            raise ValueError(
                f"corrupt dataset {self.path}/{split}: {DOC_LENGTHS} lists {len(self._lengths)} "
                f"documents but index.json has {self._dataset.num_samples}"
            )
        # Every document contributes its tokens plus one end-of-document token.
        self.samples_per_epoch = int(self._lengths.sum() + len(self._lengths)) // (seq_len + 1)
        if self.samples_per_epoch == 0:
            raise ValueError(f"split {split!r} of {self.path} has fewer than seq_len + 1 = {seq_len + 1} tokens")

        samples_per_batch = micro_batch * dp_degree
        if split == "train":
            self.num_batches = None
        else:
            self.num_batches = self.samples_per_epoch // samples_per_batch
            if self.num_batches == 0:
                raise ValueError(
                    f"split {split!r} of {self.path} packs into {self.samples_per_epoch} samples of "
                    f"seq_len + 1 = {seq_len + 1} tokens, fewer than micro_batch * dp_degree = {samples_per_batch}"
                )
            if max_batches is not None:
                self.num_batches = min(self.num_batches, max_batches)
        self._batch_index = 0
        self._epoch_cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._doc_cache: OrderedDict[int, np.ndarray] = OrderedDict()

    # ----- opening the split

    def close(self) -> None:
        """Release the dataset's shared memory now. Otherwise it stays open until the process
        exits (an exit handler holds it), so a process that opens many loaders would run out of
        file descriptors."""
        self.__dict__.pop("_dataset", None)
        release = self.__dict__.pop("_release", None)
        if release is not None:
            atexit.unregister(release)
            release()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the modules it needs may be gone already
            pass

    def _open_dataset(self, cache_dir: str | None):
        # streaming picks one process per node to set up shared memory from these
        # variables; without LOCAL_WORLD_SIZE every rank would think it is that process.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "WORLD_SIZE > 1 but LOCAL_WORLD_SIZE is unset: "
                "launch with torchrun, or set LOCAL_RANK and LOCAL_WORLD_SIZE"
            )
        if cache_dir is None:
            self._check_local_shards()
            dataset, self._release = open_streaming_dataset(local=self.path, split=self.split)
        else:
            dataset, self._release = open_streaming_dataset(
                remote=_streaming_remote(self.path), local=cache_dir, split=self.split, validate_hash="sha1"
            )
        return dataset

    def _check_local_shards(self) -> None:
        """Fail early, naming the file, when a shard of a local dataset is missing or truncated;
        remember each shard's sha1 for `_verify_shard`."""
        directory = Path(self.path, self.split)
        index_path = directory / "index.json"
        try:
            shards = json.loads(index_path.read_text())["shards"]
        except FileNotFoundError:
            raise FileNotFoundError(f"shard index not found: {index_path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptDataError(f"corrupt shard index {index_path}: {e}") from None
        for shard in shards:
            raw = shard["raw_data"]
            shard_path = directory / raw["basename"]
            if not shard_path.is_file():
                raise FileNotFoundError(f"shard file missing: {shard_path}")
            size = shard_path.stat().st_size
            if size != raw["bytes"]:
                raise CorruptDataError(f"corrupt shard file {shard_path}: {size} bytes, index.json says "
                                       f"{raw['bytes']} (truncated or rewritten; write the dataset again with lh-data)")
            self._shard_sha1[raw["basename"]] = raw.get("hashes", {}).get("sha1")

    def _verify_shard(self, shard_file: str) -> None:
        """Compare a local shard with its recorded sha1 once, before its first document is used."""
        basename = os.path.basename(shard_file)
        expected = self._shard_sha1.pop(basename, None)
        if expected is None:  # remote (streaming checked it), already verified, or no hash recorded
            return
        digest = hashlib.sha1()
        with open(shard_file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise CorruptDataError(f"corrupt shard file {shard_file}: its sha1 is {digest.hexdigest()}, index.json "
                                   f"says {expected} (write the dataset again with lh-data)")

    def _read_lengths(self, cache_dir: str | None) -> np.ndarray:
        if cache_dir is None:
            local = os.path.join(self.path, self.split, DOC_LENGTHS)
        else:
            local = os.path.join(cache_dir, self.split, DOC_LENGTHS)
            url = f"{self.path.rstrip('/')}/{self.split}/{DOC_LENGTHS}"
            if not os.path.exists(local):
                try:
                    _download(url, local)
                except FileNotFoundError:
                    raise FileNotFoundError(f"document lengths not found: {url}") from None
        try:
            return np.load(local).astype(np.int64)
        except FileNotFoundError:
            raise FileNotFoundError(f"document lengths not found: {local}") from None
        except ValueError as e:
            raise ValueError(f"corrupt document lengths {local}: {e}") from None

    # ----- packing

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, end offset of each document's span incl. its eod token) of an epoch."""
        if epoch not in self._epoch_cache:
            if self.split == "train":
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self._lengths))
            else:
                order = np.arange(len(self._lengths))
            self._epoch_cache[epoch] = (order, np.cumsum(self._lengths[order] + 1))
            if len(self._epoch_cache) > 2:  # a batch spans at most two epochs
                self._epoch_cache.popitem(last=False)
        return self._epoch_cache[epoch]

    def _document(self, doc_id: int) -> np.ndarray:
        """Token ids of a document followed by the eod token (recently used ones are cached)."""
        if doc_id in self._doc_cache:
            self._doc_cache.move_to_end(doc_id)
            return self._doc_cache[doc_id]
        shard_id, _ = self._dataset.spanner[doc_id]
        shard_file = f"{self.path}/{self.split}/{self._dataset.shards[shard_id].file_pairs[0][0].basename}"
        self._verify_shard(shard_file)
        try:
            tokens = self._dataset[doc_id]["tokens"]
        except Exception as e:
            raise RuntimeError(f"cannot read document {doc_id} from shard file {shard_file}: {e}") from e
        if tokens.shape != (self._lengths[doc_id],):
            raise CorruptDataError(
                f"corrupt shard file {shard_file}: document {doc_id} has shape {tokens.shape}, "
                f"{DOC_LENGTHS} says {self._lengths[doc_id]} tokens"
            )
        document = np.append(tokens.astype(np.int64), self.eod_id)
        self._doc_cache[doc_id] = document
        if len(self._doc_cache) > 8:
            self._doc_cache.popitem(last=False)
        return document

    def packed_sample(self, global_index: int) -> np.ndarray:
        """Global packed sample `global_index` (counted across epochs): seq_len + 1 token ids."""
        epoch, index = divmod(global_index, self.samples_per_epoch)
        order, ends = self._epoch_layout(epoch)
        size = self.seq_len + 1
        start, stop = index * size, (index + 1) * size
        sample = np.empty(size, dtype=np.int64)
        k = int(np.searchsorted(ends, start, side="right"))  # first document ending after `start`
        pos = start
        while pos < stop:
            document = self._document(int(order[k]))
            doc_start = int(ends[k]) - len(document)
            take = min(stop, int(ends[k])) - pos
            sample[pos - start : pos - start + take] = document[pos - doc_start : pos - doc_start + take]
            pos += take
            k += 1
        return sample

    # ----- iteration and resume

    def __iter__(self):
        if self.split != "train":
            self._batch_index = 0
        return self

    def __next__(self) -> torch.Tensor:
        if self.num_batches is not None and self._batch_index >= self.num_batches:
            raise StopIteration
        first = (self._batch_index * self.dp_degree + self.dp_rank) * self.micro_batch
        batch = np.stack([self.packed_sample(first + i) for i in range(self.micro_batch)])
        self._batch_index += 1
        return torch.from_numpy(batch)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the train split repeats forever and has no length")
        return self.num_batches

    def state_dict(self) -> dict:
        """Position of the loader; the same on every rank."""
        return {
            "split": self.split,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_documents": len(self._lengths),
            "samples_seen": self._batch_index * self.micro_batch * self.dp_degree,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the batches that follow equal those of the uninterrupted run.

        The global batch (micro_batch * dp_degree) may change between runs as long
        as it divides the samples already seen.
        """
        for key in ("split", "seed", "seq_len", "num_documents"):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader has {self.state_dict()[key]!r}")
        samples_per_batch = self.micro_batch * self.dp_degree
        if state["samples_seen"] % samples_per_batch:
            raise ValueError(
                f"samples_seen={state['samples_seen']} is not a multiple of "
                f"micro_batch * dp_degree = {samples_per_batch}"
            )
        self._batch_index = state["samples_seen"] // samples_per_batch
