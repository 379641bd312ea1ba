"""PackedLoader: packing, determinism, exact resume, errors.

tests/integration/test_data_loader_ranks.py reads it on two real ranks (DP and CP).
"""

import itertools
import os
import json
import shutil

import numpy as np
import pytest
import torch

from lh_dist.data.loader import CorruptDataError, PackedLoader, read_dataset_info
from lh_dist.data.shards import FORMAT_VERSION

from conftest import PACKED_SEQ_LEN, packed_loader

EOD = 256


def _docs_of_split(path, split):
    from streaming import StreamingDataset

    data = StreamingDataset(local=str(path), split=split)
    return [data[i]["tokens"].astype(np.int64) for i in range(data.num_samples)]


def test_val_packs_documents_in_order_with_eod_between(packed_dataset):
    loader = packed_loader(packed_dataset, "val")
    batches = list(loader)
    assert len(batches) == len(loader) > 1
    assert all(b.shape == (2, PACKED_SEQ_LEN + 1) and b.dtype == torch.int64 for b in batches)
    stream = np.concatenate([np.append(doc, EOD) for doc in _docs_of_split(packed_dataset, "val")])
    packed = torch.cat(batches).reshape(-1).numpy()
    assert np.array_equal(packed, stream[: len(packed)])
    assert (packed == EOD).sum() > 1
    # A second pass gives the same batches; max_batches takes the first K of them.
    assert all(torch.equal(a, b) for a, b in zip(batches, loader))
    first_two = list(packed_loader(packed_dataset, "val", max_batches=2))
    assert len(first_two) == 2 and all(torch.equal(a, b) for a, b in zip(first_two, batches))


def test_train_epoch_is_a_shuffle_of_whole_documents(packed_dataset):
    loader = packed_loader(packed_dataset, micro_batch=1)
    epoch = np.concatenate([next(loader)[0].numpy() for _ in range(loader.samples_per_epoch)])
    pieces = np.split(epoch, np.flatnonzero(epoch == EOD) + 1)
    whole = [p[:-1].tobytes() for p in pieces[:-1]]  # the last piece is the dropped tail's start
    docs = sorted(doc.tobytes() for doc in _docs_of_split(packed_dataset, "train"))
    assert len(whole) == len(set(whole)) and set(whole) <= set(docs) and len(docs) - len(whole) <= 1
    order = [docs.index(w) for w in whole]
    assert order != sorted(order)  # shuffled
    # The next epoch uses another order.
    second = np.concatenate([next(loader)[0].numpy() for _ in range(loader.samples_per_epoch)])
    assert not np.array_equal(epoch, second)


def test_same_seed_same_batches_other_seed_differs(packed_dataset):
    first = [b for b in itertools.islice(packed_loader(packed_dataset), 6)]
    again = [b for b in itertools.islice(packed_loader(packed_dataset), 6)]
    other = [b for b in itertools.islice(packed_loader(packed_dataset, seed=8), 6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_exact_resume_across_epochs(packed_dataset):
    reference = packed_loader(packed_dataset)
    batches = [next(reference) for _ in range(3 * reference.samples_per_epoch // 2)]
    interrupted = packed_loader(packed_dataset)
    cut = len(batches) // 2 + 1
    for _ in range(cut):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))  # as stored in a checkpoint
    resumed = packed_loader(packed_dataset)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed), b) for b in batches[cut:])
    # Twice the ranks with half the micro-batch continue the same global sample stream.
    half = [packed_loader(packed_dataset, micro_batch=1, dp_rank=r, dp_degree=2) for r in range(2)]
    for loader in half:
        loader.load_state_dict(state)
    assert torch.equal(torch.cat([next(half[0]), next(half[1])]), batches[cut])
    with pytest.raises(ValueError, match="seed"):
        packed_loader(packed_dataset, seed=1).load_state_dict(state)


def test_remote_dataset_through_cache_dir(packed_dataset, tmp_path):
    url = f"file://{packed_dataset}"
    cached = packed_loader(url, "val", cache_dir=str(tmp_path / "cache"))
    assert all(torch.equal(a, b) for a, b in zip(cached, packed_loader(packed_dataset, "val")))
    assert list((tmp_path / "cache" / "val").glob("shard.*.mds"))
    assert read_dataset_info(url) == read_dataset_info(str(packed_dataset))
    # A local path is read in place: cache_dir is not used.
    packed_loader(packed_dataset, "val", cache_dir=str(tmp_path / "unused"))
    assert not (tmp_path / "unused").exists()


def _read_epoch_through_cache(path, cache_dir):
    loader = packed_loader(f"file://{path}", "train", cache_dir=str(cache_dir), micro_batch=8)
    for _ in range(loader.samples_per_epoch // 8):
        next(loader)


def test_missing_or_corrupt_files_are_named(packed_dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(packed_dataset, broken)
    shard = sorted((broken / "train").glob("shard.*.mds"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"corrupt shard file .*{shard.name}"):
        packed_loader(broken)
    # Through a cache, shards are fetched (and hash-checked) when first needed.
    with pytest.raises(RuntimeError, match=f"shard file .*{shard.name}.*Checksum"):
        _read_epoch_through_cache(broken, tmp_path / "cache1")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard file missing: .*{shard.name}"):
        packed_loader(broken)
    with pytest.raises(RuntimeError, match=f"shard file .*{shard.name}"):
        _read_epoch_through_cache(broken, tmp_path / "cache2")
    info = json.loads((broken / "lh_data.json").read_text())
    (broken / "lh_data.json").write_text(json.dumps(info | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError) as e:
        read_dataset_info(str(broken))
    assert str(e.value) == (f"dataset info {broken}/lh_data.json has format_version {FORMAT_VERSION + 1}; this "
                            f"lh_dist reads format_version {FORMAT_VERSION} only (rebuild the dataset with lh-data)")
    (broken / "lh_data.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt dataset info .*lh_data.json"):
        read_dataset_info(str(broken))
    with pytest.raises(FileNotFoundError, match="nowhere.*lh_data.json"):
        packed_loader(tmp_path / "nowhere")


def test_a_local_shard_changed_in_place_is_caught_by_its_sha1(packed_dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(packed_dataset, broken)
    shard = sorted((broken / "train").glob("shard.*.mds"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size: the size check at open passes
    shard.write_bytes(bytes(data))
    loader = packed_loader(broken)
    with pytest.raises(CorruptDataError, match=f"corrupt shard file .*{shard.name}: its sha1 is [0-9a-f]{{40}}, "
                                               f"index.json says [0-9a-f]{{40}}"):
        for _ in range(loader.samples_per_epoch // 2 + 1):  # one epoch touches every shard
            next(loader)
    # The intact dataset reads through a whole epoch, each shard hashed once.
    loader = packed_loader(packed_dataset)
    for _ in range(loader.samples_per_epoch // 2):
        next(loader)
    assert loader._shard_sha1 == {}


def test_rejects_bad_arguments(packed_dataset, monkeypatch):
    with pytest.raises(ValueError, match="split"):
        packed_loader(packed_dataset, "test")
    with pytest.raises(ValueError, match="dp_rank"):
        packed_loader(packed_dataset, dp_rank=2, dp_degree=2)
    with pytest.raises(ValueError, match="micro_batch \\* dp_degree"):
        packed_loader(packed_dataset, "val", micro_batch=10_000)
    with pytest.raises(ValueError, match="cache_dir"):
        PackedLoader("s3://bucket/data", "train", seq_len=8, micro_batch=1, dp_rank=0, dp_degree=1, seed=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="LOCAL_WORLD_SIZE"):
        packed_loader(packed_dataset)


def test_opening_loaders_beside_another_one_leaks_no_file_descriptors(packed_dataset):
    # streaming attaches to every shared-memory block of the machine while it looks for a free prefix
    # (here, those of the loader left open); each attachment holds a file descriptor until it is closed.
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    kept = packed_loader(packed_dataset)
    next(iter(kept))
    before = open_fds()
    for _ in range(3):
        loader = packed_loader(packed_dataset)
        next(iter(loader))
        loader.close()
    assert open_fds() == before  # without closing the attachments: a few more after every loader
    kept.close()
