"""Mixtures of datasets: the draws, MixtureLoader against PackedLoader, resume, the sources' checks and
identity, and validation losses with their standard error.

tests/integration/test_mixture_train.py trains on a mixture under CP=2 and resumes it.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from lh_dist.config import ConfigError, load_config
from lh_dist.data.loader import PackedLoader
from lh_dist.data.mixture import MixtureLoader, source_draws, uniform_draws
from lh_dist.data.shards import write_dataset
from lh_dist.data.sources import (compare_data, data_identity, data_location, data_sources, open_loaders,
                                  with_current_documents)
from lh_dist.data.tokenizer import ByteTokenizer
from lh_dist.train.metrics import ValidationLoss

SEQ_LEN = 64


def _documents(letter: str, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        # Only this source's letter, digits and spaces: a sample tells its source by its letter.
        yield f"{letter}{i:03}", "".join(f"{letter}{j * (i + 1) % 97} " for j in range(int(rng.integers(1, 80))))


def _write(path, letter, count=80, seed=0):
    write_dataset(_documents(letter, count, seed), path, ByteTokenizer(), source=f"test {letter}", val_fraction=0.25,
                  shard_size=4096, log=lambda _: None, overwrite=True)
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return {"a": _write(root / "a", "a"), "b": _write(root / "b", "b", count=60)}


def _data_cfg(*overrides):
    return load_config(None, [f"data.seq_len={SEQ_LEN}", "data.micro_batch=2", *overrides]).data


def _mixture_cfg(datasets, weights=(3, 1)):
    sources = ", ".join(f"{{path: {datasets[n]}, weight: {w}}}" for n, w in zip("ab", weights))
    return _data_cfg(f"data.sources=[{sources}]")


def _loaders(data, **overrides):
    kwargs = dict(eval_batches=2, dp_rank=0, dp_degree=1, seed=5, cache_dir="unused") | overrides
    return open_loaders(data, data_sources(data), **kwargs)


@pytest.fixture(scope="module")
def packed(datasets):
    """The train loaders of the two datasets, seed 5. A mixture reads them only through `packed_sample`,
    which keeps no position, so the tests share them (each loader opened holds hundreds of file
    descriptors of streaming's shared memory until the process exits)."""
    return {name: PackedLoader(str(path), "train", seq_len=SEQ_LEN, micro_batch=1, dp_rank=0, dp_degree=1, seed=5)
            for name, path in datasets.items()}


def _mixture(packed, *, micro_batch=2, dp_rank=0, dp_degree=1, seed=5):
    return MixtureLoader(packed, {"a": 3.0, "b": 1.0}, micro_batch=micro_batch, dp_rank=dp_rank, dp_degree=dp_degree,
                         seed=seed)


# ---- the draws ------------------------------------------------------------------------------------

def test_draws_are_a_function_of_seed_and_sample_index():
    first = source_draws(7, 0, 1000, [2.0, 1.0, 1.0])
    assert np.array_equal(first, source_draws(7, 0, 1000, [2.0, 1.0, 1.0]))
    # Any window of the sequence is the same draws: sample i does not depend on where a batch starts.
    assert np.array_equal(first[300:700], source_draws(7, 300, 400, [2.0, 1.0, 1.0]))
    other = source_draws(8, 0, 1000, [2.0, 1.0, 1.0])
    assert (first != other).mean() > 0.3  # independent draws agree with probability 3/8
    u = uniform_draws(7, 0, 100_000)
    assert u.min() >= 0 and u.max() < 1


@pytest.mark.parametrize("weights", [[3.0, 1.0], [0.5, 0.25, 0.2, 0.05]])
def test_observed_proportions_stay_within_binomial_bounds(weights):
    n = 4000
    counts = np.bincount(source_draws(0, 0, n, weights), minlength=len(weights))
    for count, w in zip(counts, weights):
        # Each source's count is Binomial(n, p) with p = w / sum(w): mean n p, standard deviation
        # sqrt(n p (1 - p)). A deviation beyond 4 of them has probability below 1e-4 (6.3e-5 under
        # the normal approximation), so a correct draw fails this test about once in 10,000 seeds.
        p = w / sum(weights)
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (counts, weights)


# ---- MixtureLoader --------------------------------------------------------------------------------

def test_one_source_mixture_gives_the_packed_loaders_batches(datasets, packed):
    for dp_rank in (0, 1):
        alone = PackedLoader(str(datasets["a"]), "train", seq_len=SEQ_LEN, micro_batch=2, dp_rank=dp_rank, dp_degree=2,
                             seed=5)
        mixture = MixtureLoader({"a": packed["a"]}, {"a": 1.0}, micro_batch=2, dp_rank=dp_rank, dp_degree=2, seed=5)
        for _ in range(6):
            assert torch.equal(next(mixture), next(alone))


def test_data_path_still_reads_one_packed_loader(datasets, packed):
    train, val = _loaders(_data_cfg(f"data.path={datasets['a']}"))
    assert type(train) is PackedLoader and list(val) == ["a"]
    for b in range(4):
        expected = np.stack([packed["a"].packed_sample(2 * b + i) for i in (0, 1)])  # [micro_batch, seq_len + 1]
        assert torch.equal(next(train), torch.from_numpy(expected))


def test_each_source_is_read_in_its_own_order(datasets, packed):
    train, val = _loaders(_mixture_cfg(datasets))
    assert isinstance(train, MixtureLoader) and list(val) == ["a", "b"] and train.weights == [3.0, 1.0]
    drawn = {"a": 0, "b": 0}
    for _ in range(10):
        for sample in next(train).numpy():
            name = "a" if (sample == ord("a")).any() else "b"  # a sample holds its source's letter
            assert np.array_equal(sample, packed[name].packed_sample(drawn[name]))
            drawn[name] += 1
    assert drawn == {name: s["samples_seen"] for name, s in train.state_dict()["sources"].items()}
    assert list(drawn.values()) == np.bincount(source_draws(5, 0, 20, [3.0, 1.0])).tolist()


def test_dp_ranks_split_one_global_sequence_and_resume_exactly(packed):
    whole = _mixture(packed)
    ranks = [_mixture(packed, micro_batch=1, dp_rank=r, dp_degree=2) for r in (0, 1)]
    for _ in range(5):  # micro_batch 2 on one rank = micro_batch 1 on each of two ranks
        batch = next(whole)
        assert torch.equal(batch, torch.cat([next(r) for r in ranks]))
    state = json.loads(json.dumps(whole.state_dict()))  # as a checkpoint holds it
    assert state["samples_seen"] == 10
    expected = [next(whole) for _ in range(4)]
    resumed = _mixture(packed)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed), batch) for batch in expected)
    # Another seed draws other sources.
    other, same = _mixture(packed, seed=6), _mixture(packed)
    assert any(not torch.equal(next(other), next(same)) for _ in range(5))


def test_mixture_state_refuses_other_sources_and_rebuilt_data_unless_adopted(packed):
    train = _mixture(packed)
    next(train)
    state = train.state_dict()
    fewer = dict(state, sources={"a": state["sources"]["a"]})
    with pytest.raises(ValueError, match=r"sources \['a'\], this mixture has \['a', 'b'\]"):
        _mixture(packed).load_state_dict(fewer)
    rebuilt = json.loads(json.dumps(state))
    rebuilt["sources"]["b"]["num_documents"] += 1
    fresh = _mixture(packed)
    with pytest.raises(ValueError, match="source b has num_documents"):
        fresh.load_state_dict(rebuilt)
    fresh.load_state_dict(with_current_documents(rebuilt, fresh.state_dict()))
    assert fresh.state_dict() == state  # the counters are kept


# ---- the sources' checks --------------------------------------------------------------------------

def test_config_errors_are_one_line():
    cases = {
        ("data.path=x", "data.sources=[{path: y}]"): "data.path and data.sources: set exactly one",
        ("data.sources=[{path: y, weight: 0}]",): "data.sources[0].weight must be a positive number, got 0.0",
        ("data.sources=[{path: y, weight: -1}]",): "data.sources[0].weight must be a positive number",
        ("data.sources=[{path: a/x}, {path: b/x}]",): "data.sources[1].name must be unique among the sources, got 'x'",
        ("data.sources=[{path: a, name: web}, {path: b, name: web}]",): "data.sources[1].name must be unique",
        ("data.sources=[{path: a, share: 2}]",): "unknown key data.sources[0].share; allowed keys under "
                                                 "data.sources[0]: path, weight, name",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, list(overrides))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    # The name defaults to the path's last part; no data settings at all mean the default dataset.
    data = load_config(None, ["data.sources=[{path: runs/data/web/}, {path: s3://bucket/code, weight: 2}]"]).data
    assert [(s.name, s.weight) for s in data.sources] == [("web", 1.0), ("code", 2.0)] and data.path == ""
    assert load_config(None).data.path == "runs/data/stdlib"


def test_missing_source_and_other_tokenizer_are_refused_naming_the_source(datasets, tmp_path):
    data = _data_cfg(f"data.sources=[{{path: {datasets['a']}}}, {{path: {tmp_path / 'nowhere'}}}]")
    with pytest.raises(ConfigError, match=rf"^data.sources\[1\] \(nowhere\): dataset folder {tmp_path / 'nowhere'} "
                                          r"does not exist"):
        data_sources(data)
    other = tmp_path / "other"
    shutil.copytree(datasets["b"], other)
    info = json.loads((other / "lh_data.json").read_text())
    info["tokenizer_identity"]["sha256"] = "f" * 64
    (other / "lh_data.json").write_text(json.dumps(info))
    data = _data_cfg(f"data.sources=[{{path: {datasets['a']}}}, {{path: {other}}}]")
    with pytest.raises(ConfigError) as e:
        data_sources(data)
    assert str(e.value).startswith(f"data.sources[1] (other): {other} was tokenized with another tokenizer than "
                                   f"data.sources[0] (a) {datasets['a']} (sha256 ffffffffffff vs ")
    assert "\n" not in str(e.value)


def test_identity_records_content_and_tells_a_rebuilt_dataset(datasets, packed, tmp_path):
    data = _mixture_cfg(datasets)
    sources = data_sources(data)
    record = dict(_mixture(packed).state_dict(), **data_identity(data, sources))
    assert record["datasets"]["b"] == {"path": data_location(str(datasets["b"])),
                                       "content_sha256": sources[1].info["content_sha256"]}
    same = compare_data(record, data, sources)
    assert (same.moved, same.changed, same.unrecorded) == ([], [], [])

    rebuilt = tmp_path / "b"  # the same documents but one, at another path: compare content only
    _write(rebuilt, "b", count=60, seed=1)
    record["datasets"]["b"]["path"] = data_location(str(rebuilt))
    data2 = _data_cfg(f"data.sources=[{{path: {datasets['a']}, weight: 3}}, {{path: {rebuilt}}}]")
    result = compare_data(record, data2, data_sources(data2))
    assert result.moved == [] and len(result.changed) == 1
    assert result.changed[0].startswith(f"data.sources b {rebuilt} (content_sha256 ")
    # A checkpoint of an older lh_dist has no hash: the document count still tells a rebuilt dataset.
    record["datasets"]["b"]["content_sha256"] = None
    assert compare_data(record, data2, data_sources(data2)).unrecorded == [f"data.sources b {rebuilt}"]
    record["sources"]["b"]["num_documents"] -= 1
    assert "train documents" in compare_data(record, data2, data_sources(data2)).changed[0]

    # The same sources in another order would draw other sources from the same sample on.
    swapped = _data_cfg(f"data.sources=[{{path: {rebuilt}}}, {{path: {datasets['a']}, weight: 3}}]")
    assert compare_data(record, swapped, data_sources(swapped)).moved == [
        "the order data.sources [a, b] -> data.sources [b, a] (samples draw their source by position in the list)"]

    single = _data_cfg(f"data.path={datasets['a']}")
    moved = compare_data(record, single, data_sources(single)).moved
    assert moved == ["data.sources [a, b] -> data.path"]


# ---- validation losses ----------------------------------------------------------------------------

def test_validation_loss_is_the_sample_mean_with_its_standard_error():
    x = np.array([2.1, 2.5, 1.9, 2.2, 2.4, 2.0])
    v = ValidationLoss.from_sums(x.sum(), (x ** 2).sum(), len(x))
    # float64 throughout: the mean is exact to ~1e-16; the variance from sums loses
    # sum(x^2) / (n var) ~ 30 / 0.25 ~ 1e2 of that to cancellation, far inside these bounds.
    assert v.samples == 6 and v.loss == pytest.approx(x.mean(), rel=1e-12)
    assert v.stderr == pytest.approx(x.std(ddof=1) / math.sqrt(6), rel=1e-9)
    assert v.text() == f"{x.mean():.4f} ± {x.std(ddof=1) / math.sqrt(6):.4f} over 6 samples"
    assert v.scalars("val/web") == {"val/web/loss": v.loss, "val/web/loss_stderr": v.stderr}
    one = ValidationLoss.from_sums(2.0, 4.0, 1)
    assert math.isnan(one.stderr) and one.text() == "2.0000 over 1 sample" and one.scalars("val") == {"val/loss": 2.0}

    a, b = ValidationLoss(2.0, 0.03, 16), ValidationLoss(3.0, 0.04, 16)
    mix = ValidationLoss.weighted({"a": a, "b": b}, {"a": 3.0, "b": 1.0})
    assert mix.loss == pytest.approx(0.75 * 2.0 + 0.25 * 3.0)
    assert mix.stderr == pytest.approx(math.hypot(0.75 * 0.03, 0.25 * 0.04)) and mix.samples == 32
