"""A weighted mixture of datasets: packed samples drawn from several `PackedLoader`s.

Global packed sample g (counted over all DP ranks, in the order of `PackedLoader`: batch b of
DP rank r holds g = (b*dp_degree + r)*micro_batch + i) comes from source `source_draws(seed, g)`,
a pure function of (seed, g): a counter-based hash (SplitMix64 of g under a seed-derived key)
turned into a uniform number in [0, 1) and looked up in the weights' cumulative distribution.
The j-th sample drawn from a source is that source's own packed sample j (its own shuffled
document order), so every source is read in order without repeats until its epoch ends.

Every rank draws the sources of the whole global batch, so it knows how many samples each source
gave the lower DP ranks; the loader's state is the global sample counter and one counter per
source. Resume is exact, and the ranks of a CP group (same dp_rank) get the same samples.
"""

from __future__ import annotations

import numpy as np
import torch

from lh_dist.data.loader import PackedLoader

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 values (a bijection that mixes every input bit)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_draws(seed: int, first: int, count: int) -> np.ndarray:
    """float64 [count] in [0, 1): the draws of global samples first .. first + count - 1 under `seed`."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around by design
        key = _splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))
        counters = np.arange(first, first + count, dtype=np.uint64) + np.uint64(1)
        bits = _splitmix64(key + counters * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) / 2.0**53  # the top 53 bits: exact in float64


def source_draws(seed: int, first: int, count: int, weights) -> np.ndarray:
    """int64 [count]: the source index (into `weights`) of global samples first .. first + count - 1.

    Source s is drawn with probability weights[s] / sum(weights), independently for every sample."""
    weights = np.asarray(weights, dtype=np.float64)
    cdf = np.cumsum(weights) / weights.sum()
    cdf[-1] = 1.0  # rounding must not leave a draw past the last source
    return np.searchsorted(cdf, uniform_draws(seed, first, count), side="right")


class MixtureLoader:
    """Iterator of LongTensor `[micro_batch, seq_len + 1]` drawn from the train splits of several
    `PackedLoader`s (`loaders`: name -> loader, all of one seq_len) with relative `weights` (name -> w).
    Repeats forever, like a train `PackedLoader`; the sub-loaders' own dp settings are not used."""

    def __init__(self, loaders: dict[str, PackedLoader], weights: dict[str, float], *, micro_batch: int,
                 dp_rank: int, dp_degree: int, seed: int):
        if not loaders or set(loaders) != set(weights):
            raise ValueError(f"one weight per loader is needed, got loaders {sorted(loaders)} and weights "
                             f"{sorted(weights)}")
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank must be in [0, {dp_degree}), got {dp_rank}")
        seq_lens = {loader.seq_len for loader in loaders.values()}
        if len(seq_lens) != 1:
            raise ValueError(f"the loaders of a mixture must share seq_len, got {sorted(seq_lens)}")
        self.loaders, self.names = loaders, list(loaders)
        self.weights = [float(weights[name]) for name in self.names]
        self.seq_len, self.seed = seq_lens.pop(), seed
        self.micro_batch, self.dp_rank, self.dp_degree = micro_batch, dp_rank, dp_degree
        self.samples_seen = 0  # global samples drawn, all DP ranks together
        self.drawn = dict.fromkeys(self.names, 0)  # samples each source has given

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        per_batch = self.micro_batch * self.dp_degree
        sources = source_draws(self.seed, self.samples_seen, per_batch, self.weights)  # [per_batch]
        # Each global sample's index within its source: the source's count before this batch plus
        # the samples it gave earlier in this batch.
        index = np.empty(per_batch, dtype=np.int64)
        for s, name in enumerate(self.names):
            hits = np.flatnonzero(sources == s)
            index[hits] = self.drawn[name] + np.arange(len(hits))
            self.drawn[name] += len(hits)
        mine = range(self.dp_rank * self.micro_batch, (self.dp_rank + 1) * self.micro_batch)
        batch = np.stack([self.loaders[self.names[sources[g]]].packed_sample(int(index[g])) for g in mine])
        self.samples_seen += per_batch
        return torch.from_numpy(batch)  # [micro_batch, seq_len + 1]

    def __len__(self) -> int:
        raise TypeError("a mixture repeats forever and has no length")

    def close(self) -> None:
        """Release every source's shared memory (see `PackedLoader.close`)."""
        for loader in self.loaders.values():
            loader.close()

    def state_dict(self) -> dict:
        """Position of the mixture: the global counter and each source's; the same on every rank."""
        return {"split": "train", "seed": self.seed, "seq_len": self.seq_len, "samples_seen": self.samples_seen,
                "sources": {name: {"samples_seen": self.drawn[name],
                                   "num_documents": loader.state_dict()["num_documents"]}
                            for name, loader in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the batches that follow equal those of the uninterrupted run.

        The weights and the global batch may differ from the run that saved it: the draws from here
        on follow the new weights, and every source continues its own order where it stopped."""
        mine = self.state_dict()
        for key in ("split", "seed", "seq_len"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader has {mine[key]!r}")
        if set(state["sources"]) != set(self.names):
            raise ValueError(f"loader state has sources {sorted(state['sources'])}, this mixture has "
                             f"{sorted(self.names)}")
        for name, saved in state["sources"].items():
            if saved["num_documents"] != mine["sources"][name]["num_documents"]:
                raise ValueError(f"loader state of source {name} has num_documents={saved['num_documents']}, "
                                 f"this loader has {mine['sources'][name]['num_documents']}")
        self.samples_seen = state["samples_seen"]
        self.drawn = {name: saved["samples_seen"] for name, saved in state["sources"].items()}
