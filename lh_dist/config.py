"""Run configuration: one dataclass per component, composed into `TrainConfig`.

Runs are YAML files (see `configs/`) plus `section.field=value` overrides from
the command line. Everything is checked here, before any process group, GPU or
data file is touched: unknown keys, wrong types and out-of-range values raise
`ConfigError` naming the field and what it accepts.

The values a field allows and the rules it must keep belong to the module that acts on them
(attention backends, Lighthouse backends, scorers and parameter rules, CP exchanges, devices):
the Literal types and checks below take them from there. Those modules register no custom op, so
validating a config loads no kernel.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml

from lh_dist.errors import ConfigError
from lh_dist.ops.attention.dispatch import BACKENDS as ATTENTION_BACKENDS
from lh_dist.ops.lighthouse.params import BACKENDS as LIGHTHOUSE_BACKENDS
from lh_dist.ops.lighthouse.params import LighthouseArgError, LighthouseParams
from lh_dist.ops.lighthouse.scorers import SCORERS
from lh_dist.parallel.comm import EXCHANGES
from lh_dist.parallel.device import DEVICES


def _check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


# The fields each RoPE scaling type reads; the others must keep their defaults.
_ROPE_SCALING_FIELDS = {
    "none": (),
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"),
}


@dataclass(kw_only=True)
class RopeScalingConfig:
    """How RoPE's frequencies are stretched for contexts beyond the original one (Hugging Face's
    `rope_scaling`, same names and meanings). Fields that the chosen type does not read must stay unset."""

    # none: plain RoPE; linear: every frequency divided by factor; llama3: Llama 3.1's blend (low
    # frequencies divided by factor, high ones kept); yarn: YaRN (a per-frequency ramp and a cos/sin multiplier).
    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    # How many times longer the new context is (linear, llama3, yarn); 0 = unset.
    factor: float = 0.0
    # The context length before the extension (llama3, yarn; a Hugging Face yarn config without
    # it means its max_position_embeddings); 0 = unset.
    original_max_position_embeddings: int = 0
    # llama3: wavelengths above original / low_freq_factor are divided by factor, those below
    # original / high_freq_factor kept, those between blended; 0 = unset.
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    # yarn: frequencies turning more than beta_fast times over the original context are kept,
    # fewer than beta_slow times divided by factor, a linear ramp between.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # yarn: the cos/sin multiplier; 0 derives it from factor: 0.1 ln(factor) + 1, or with mscale and
    # mscale_all_dim both set, (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim ln(factor) + 1).
    attention_factor: float = 0.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    # yarn: round the ramp's ends outwards to whole frequency indices.
    truncate: bool = True

    def yarn_attention_factor(self) -> float:
        """YaRN's multiplier of cos and sin: attention_factor where set, else derived from factor as the
        comment on attention_factor says (transformers derives it the same way)."""
        def mscale(m: float = 1.0) -> float:  # 0.1 m ln(factor) + 1, for a context factor times longer
            return 1.0 if self.factor <= 1 else 0.1 * m * math.log(self.factor) + 1.0

        if self.attention_factor:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return mscale(self.mscale) / mscale(self.mscale_all_dim)
        return mscale()

    def validate(self, p: str = "model.rope_scaling") -> None:
        """ConfigError naming the first field (as `p`.field) that is out of range or not read by `type`."""
        used = _ROPE_SCALING_FIELDS[self.type]
        for f in dataclasses.fields(self):
            if f.name != "type" and f.name not in used:
                _check(getattr(self, f.name) == f.default, f"{p}.{f.name}",
                       f"left unset (type {self.type!r} does not read it)", getattr(self, f.name))
        if self.type == "none":
            return
        _check(self.factor >= 1, f"{p}.factor", f">= 1 with type {self.type!r}", self.factor)
        if self.type in ("llama3", "yarn"):
            _check(self.original_max_position_embeddings > 0, f"{p}.original_max_position_embeddings",
                   f"a positive integer with type {self.type!r}", self.original_max_position_embeddings)
        if self.type == "llama3":
            _check(self.low_freq_factor > 0, f"{p}.low_freq_factor", "positive with type 'llama3'",
                   self.low_freq_factor)
            _check(self.high_freq_factor > self.low_freq_factor, f"{p}.high_freq_factor",
                   f"greater than {p}.low_freq_factor={self.low_freq_factor}", self.high_freq_factor)
        if self.type == "yarn":
            _check(self.beta_slow > 0, f"{p}.beta_slow", "positive", self.beta_slow)
            _check(self.beta_fast >= self.beta_slow, f"{p}.beta_fast", f">= {p}.beta_slow={self.beta_slow}",
                   self.beta_fast)
            for name in ("attention_factor", "mscale", "mscale_all_dim"):
                _check(getattr(self, name) >= 0, f"{p}.{name}", ">= 0 (0: unset)", getattr(self, name))


@dataclass(kw_only=True)
class ModelConfig:
    """Llama-3-style decoder shape, with the options of Mistral, Qwen2 and Qwen3 checkpoints."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    # Width of one attention head; 0 means dim / n_heads (resolved on construction, so
    # `head_dim` is always the width in use). Qwen3 sets it apart from dim / n_heads.
    head_dim: int = 0
    ffn_hidden: int = 704
    vocab_size: int = 257
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    # Biases on the q, k and v projections (Qwen2); the output projection never has one.
    attention_bias: bool = False
    # RMSNorm of each query and key head (weight [head_dim]) before RoPE (Qwen3).
    qk_norm: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Kernel behind every dense attention call (see lh_dist.ops.attention).
    attention_backend: Literal[ATTENTION_BACKENDS] = "auto"

    def __post_init__(self) -> None:
        # Left at 0 when dim does not split into n_heads, for validate to say so.
        if self.head_dim == 0 and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads

    def validate(self, p: str = "model") -> None:
        """ConfigError naming the first field (as `p`.field) that is out of range."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size"):
            _check(getattr(self, name) > 0, f"{p}.{name}", "a positive integer", getattr(self, name))
        _check(self.head_dim != 0 or self.dim % self.n_heads == 0, f"{p}.dim",
               f"divisible by {p}.n_heads={self.n_heads} (or {p}.head_dim set)", self.dim)
        _check(self.head_dim > 0 and self.head_dim % 2 == 0, f"{p}.head_dim",
               "a positive even integer (RoPE rotates pairs; 0 means dim / n_heads)", self.head_dim)
        _check(self.n_heads % self.n_kv_heads == 0, f"{p}.n_kv_heads",
               f"a divisor of {p}.n_heads={self.n_heads}", self.n_kv_heads)
        _check(self.rope_theta > 0, f"{p}.rope_theta", "positive", self.rope_theta)
        self.rope_scaling.validate(f"{p}.rope_scaling")
        _check(self.norm_eps > 0, f"{p}.norm_eps", "positive", self.norm_eps)
        _check(self.init_std > 0, f"{p}.init_std", "positive", self.init_std)


@dataclass(kw_only=True)
class LighthouseConfig:
    """Lighthouse attention (used by the layers not listed as dense, in the Lighthouse phase)."""

    levels: int = 3
    pooling: int = 4
    topk: int = 2048
    # Layers that always run dense; negative indices count from the end.
    dense_layers: list[int] = field(default_factory=lambda: [0, 1, -2, -1])
    scorer: Literal[tuple(SCORERS)] = "norm"
    # With model.qk_norm, what the scorer reads: the normalized q/k the layer attends with, or the
    # projections before the norm (docs/DESIGN.md §2, benchmarks/results/qk_norm_scores.md).
    score_from: Literal["normalized", "projections"] = "normalized"
    backend: Literal[LIGHTHOUSE_BACKENDS] = "auto"

    def validate(self, p: str = "lighthouse") -> None:
        """ConfigError naming the first field (as `p`.field) that breaks LighthouseParams' rules."""
        try:
            LighthouseParams.from_config(self)
        except LighthouseArgError as e:
            raise ConfigError(f"{p}.{e.arg}: {e}") from None


@dataclass(kw_only=True)
class ParallelConfig:
    """How ranks split the work: data parallel x context parallel (CP innermost)."""

    # 0 means "the world size divided by cp_degree".
    dp_degree: int = 0
    cp_degree: int = 1
    # How Lighthouse under CP shares the selected summaries between ranks.
    lighthouse_exchange: Literal[EXCHANGES] = "allgather"
    zero_stage: int = 0
    # Recompute in backward: "full" every block's forward, "selective" all of it but attention
    # (whose outputs are kept), "none" nothing (fastest, most memory).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # "cpu": what checkpointing keeps of each block, its input, waits in pinned host memory
    # between the block's forward and its backward (copies overlapped with compute).
    activation_offload: Literal["none", "cpu"] = "none"
    # How many blocks, the first ones, offload their input (0: all). Fewer blocks hold less host
    # memory: at 2M tokens the paper model's 30 inputs are 120 GiB, more than most hosts can pin.
    activation_offload_layers: int = 0
    # torch.compile each block (fuses the elementwise work around the attention kernels).
    compile: bool = False

    def validate(self, p: str = "parallel") -> None:
        """ConfigError naming the first field out of range (`p` is the section's name)."""
        _check(self.dp_degree >= 0, f"{p}.dp_degree", "0 (auto) or a positive integer", self.dp_degree)
        _check(self.cp_degree >= 1, f"{p}.cp_degree", "a positive integer", self.cp_degree)
        _check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", "one of 0, 1, 2, 3", self.zero_stage)
        if self.activation_offload != "none" and self.activation_checkpointing == "none":
            raise ConfigError(f"{p}.activation_offload needs {p}.activation_checkpointing full or selective")
        _check(self.activation_offload_layers >= 0, f"{p}.activation_offload_layers", "0 (all) or a positive integer",
               self.activation_offload_layers)

    def check_world_size(self, world_size: int) -> None:
        """ConfigError unless cp_degree divides the world size (each CP group is cp_degree ranks)."""
        if world_size % self.cp_degree:
            hint = (f" (one process: start {self.cp_degree} ranks with torchrun --nproc-per-node {self.cp_degree}, "
                    f"or set parallel.cp_degree=1)" if world_size == 1 else "")
            raise ConfigError(f"parallel.cp_degree={self.cp_degree} must divide the world size {world_size}{hint}")


DEFAULT_DATA_PATH = "runs/data/stdlib"
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(kw_only=True)
class SourceConfig:
    """One dataset of a mixture (an entry of `data.sources`)."""

    # Folder or URL, as data.path.
    path: str = ""
    # Relative share of the packed samples: this source's are weight / (sum of the weights).
    weight: float = 1.0
    # Names the source in metrics (val/<name>/loss) and checkpoints; empty means the path's last part.
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = PurePosixPath(self.path.rstrip("/")).name


@dataclass(kw_only=True)
class DataConfig:
    """Token shards written by `lh-data` and how samples are cut from them."""

    # Folder (or remote URL that mosaicml-streaming supports) holding train/, val/ and lh_data.json.
    # Empty when `sources` is set; with neither set it is DEFAULT_DATA_PATH.
    path: str = ""
    # Instead of path: a weighted mixture of datasets (lh_dist.data.mixture), e.g.
    # [{path: runs/data/code, weight: 3}, {path: runs/data/web, weight: 1, name: web}].
    sources: list[SourceConfig] = field(default_factory=list)
    # Local cache for remote data; empty means <run_dir>/data_cache.
    cache_dir: str = ""
    seq_len: int = 512
    micro_batch: int = 1

    def __post_init__(self) -> None:
        if not self.path and not self.sources:
            self.path = DEFAULT_DATA_PATH

    @property
    def primary_path(self) -> str:
        """data.path, or the first source's path of a mixture (every source has the same tokenizer):
        what evaluation reads when told no dataset."""
        return self.path or self.sources[0].path

    def validate(self, p: str = "data") -> None:
        """ConfigError naming the first field (as `p`.field) that is out of range."""
        if self.path and self.sources:
            raise ConfigError(f"{p}.path and {p}.sources: set exactly one ({p}.path names one dataset, {p}.sources "
                              f"a mixture; the override {p}.path= clears the path)")
        names = set()
        for i, source in enumerate(self.sources):
            q = f"{p}.sources[{i}]"
            _check(bool(source.path), f"{q}.path", "a non-empty folder or URL", source.path)
            _check(source.weight > 0, f"{q}.weight", "a positive number", source.weight)
            _check(bool(_SOURCE_NAME.match(source.name)), f"{q}.name",
                   "letters, digits, '_', '.' or '-' (set it when the path's last part is not)", source.name)
            _check(source.name not in names, f"{q}.name", "unique among the sources", source.name)
            names.add(source.name)
        _check(self.seq_len >= 2, f"{p}.seq_len", "an integer >= 2", self.seq_len)
        _check(self.micro_batch >= 1, f"{p}.micro_batch", "a positive integer", self.micro_batch)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1

    def validate(self, p: str = "optim") -> None:
        """ConfigError naming the first field (as `p`.field) that is out of range."""
        _check(self.lr > 0, f"{p}.lr", "positive", self.lr)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas",
               "two numbers in [0, 1)", self.betas)
        _check(self.eps > 0, f"{p}.eps", "positive", self.eps)
        _check(self.weight_decay >= 0, f"{p}.weight_decay", ">= 0", self.weight_decay)
        _check(self.grad_clip >= 0, f"{p}.grad_clip", ">= 0 (0 disables clipping)", self.grad_clip)
        _check(self.grad_accum >= 1, f"{p}.grad_accum", "a positive integer", self.grad_accum)


@dataclass(kw_only=True)
class ScheduleConfig:
    """Steps, learning-rate schedule and the Lighthouse -> dense switch."""

    steps: int = 200
    warmup_steps: int = 20
    decay: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1
    # The decay's length, ending at the last step; between warmup and it the learning rate holds at its peak
    # (warmup-stable-decay, so that a late phase such as the dense one does not start at a decayed rate).
    # None: every step after warmup.
    decay_steps: int | None = None
    # Optimizer steps that use Lighthouse attention before the switch to dense (0: dense run).
    lighthouse_steps: int = 0
    # Consecutive steps with a non-finite loss or gradient tolerated (each is skipped) before the run aborts.
    max_nonfinite_steps: int = 5

    def validate(self, p: str = "schedule") -> None:
        """ConfigError naming the first field (as `p`.field) that is out of range."""
        _check(self.steps >= 1, f"{p}.steps", "a positive integer", self.steps)
        _check(0 <= self.warmup_steps <= self.steps, f"{p}.warmup_steps", f"in [0, {p}.steps={self.steps}]",
               self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        if self.decay_steps is not None:
            after_warmup = self.steps - self.warmup_steps
            _check(0 <= self.decay_steps <= after_warmup, f"{p}.decay_steps",
                   f"in [0, {p}.steps - {p}.warmup_steps = {after_warmup}] or null", self.decay_steps)
        _check(0 <= self.lighthouse_steps <= self.steps, f"{p}.lighthouse_steps",
               f"in [0, {p}.steps={self.steps}]", self.lighthouse_steps)
        _check(self.max_nonfinite_steps >= 1, f"{p}.max_nonfinite_steps", "a positive integer",
               self.max_nonfinite_steps)


@dataclass(kw_only=True)
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    interval: int = 100
    keep: int = 2

    def validate(self, p: str = "checkpoint") -> None:
        """ConfigError naming the first field (as `p`.field) that is out of range."""
        _check(self.interval >= 1, f"{p}.interval", "a positive integer", self.interval)
        _check(self.keep >= 1, f"{p}.keep", "a positive integer", self.keep)


@dataclass(kw_only=True)
class LoggingConfig:
    """Run directory, console and TensorBoard."""

    # The built-in defaults' own folder: configs/tiny-cpu.yaml's model differs, and so does its runs/tiny-cpu.
    run_dir: str = "runs/default"
    log_interval: int = 10
    eval_interval: int = 100
    # Validation batches per DP rank (per source of a mixture); 16 samples or more give a usable standard error.
    eval_batches: int = 16
    # Steps between images of one layer's Lighthouse selection map (0: never).
    selection_map_interval: int = 0

    def validate(self, p: str = "logging") -> None:
        """ConfigError naming the first field (as `p`.field) that is out of range."""
        _check(bool(self.run_dir), f"{p}.run_dir", "a non-empty path", self.run_dir)
        for name in ("log_interval", "eval_interval", "eval_batches"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", "a positive integer", getattr(self, name))
        _check(self.selection_map_interval >= 0, f"{p}.selection_map_interval", ">= 0",
               self.selection_map_interval)


@dataclass(kw_only=True)
class TrainConfig:
    """A whole run: one section per component, the seed, and the device every rank runs on."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lighthouse: LighthouseConfig = field(default_factory=LighthouseConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    device: Literal[DEVICES] = "auto"

    def validate(self, world_size: int | None = None) -> None:
        """Validate every section, then (given the world size) that cp_degree fits it, then what spans
        sections (Lighthouse's tiling, zigzag sharding: both depend on cp_degree)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        if world_size is not None:
            self.parallel.check_world_size(world_size)
        n = self.model.n_layers
        if self.schedule.lighthouse_steps > 0:
            for i in self.lighthouse.dense_layers:
                _check(-n <= i < n, "lighthouse.dense_layers", f"layer indices in [-{n}, {n})",
                       self.lighthouse.dense_layers)
            validate_lighthouse_shape(self)
        _check(self.parallel.activation_offload_layers <= n, "parallel.activation_offload_layers",
               f"at most model.n_layers = {n}", self.parallel.activation_offload_layers)
        chunks = 2 * self.parallel.cp_degree
        _check(self.data.seq_len % chunks == 0, "data.seq_len",
               f"divisible by 2 * parallel.cp_degree = {chunks} (zigzag sharding)", self.data.seq_len)

    def to_dict(self) -> dict:
        """Nested plain dict {section: {field: value}}, as YAML and JSON hold it."""
        return dataclasses.asdict(self)


# The config field behind each argument that LighthouseParams checks.
_LIGHTHOUSE_ARG_FIELDS = {"n": "data.seq_len", "levels": "lighthouse.levels", "pooling": "lighthouse.pooling",
                         "topk": "lighthouse.topk", "chunks": "parallel.cp_degree"}


def validate_lighthouse_shape(cfg: TrainConfig) -> None:
    """Check that Lighthouse can tile the training sequence on every CP rank (the kernels' own rules)."""
    lh, cp = cfg.lighthouse, cfg.parallel.cp_degree
    try:
        # CP cuts the sequence into 2 * cp zigzag chunks that select independently.
        LighthouseParams.from_config(lh).check(cfg.data.seq_len, chunks=2 * cp if cp > 1 else 1)
    except LighthouseArgError as e:
        field = _LIGHTHOUSE_ARG_FIELDS[e.arg]
        raise ConfigError(f"{field}: {e} (here n = data.seq_len, chunks = 2 * parallel.cp_degree)") from None


# ---- loading -------------------------------------------------------------------------------

def _optional(tp):
    """T of a field typed T | None, else None."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _type_name(tp) -> str:
    if _optional(tp) is not None:
        return f"{_type_name(_optional(tp))} or null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return "a list of mappings" if dataclasses.is_dataclass(item) else f"a list of {item.__name__}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, name: str):
    if _optional(tp) is not None:
        return None if value is None else _coerce(value, _optional(tp), name)
    origin = typing.get_origin(tp)
    if origin is Literal:
        _check(value in typing.get_args(tp), name, _type_name(tp), value)
        return value
    if origin is list:
        _check(isinstance(value, (list, tuple)), name, _type_name(tp), value)
        return [_coerce(v, typing.get_args(tp)[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, f"{name}.")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, _type_name(tp), value)
        _check(math.isfinite(value), name, "a finite number", value)
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, _type_name(tp), value)
        return value
    _check(isinstance(value, tp), name, _type_name(tp), value)
    return value


# Values that older configs (and the config.yaml of older runs) hold, read as what they meant.
_LEGACY_VALUES = {"parallel.activation_checkpointing": {True: "full", False: "none"}}


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        value = _LEGACY_VALUES.get(f"{prefix}{key}", {}).get(value, value) if isinstance(value, bool) else value
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error on one line: what was wrong and where (PyYAML's own text spans several,
    quoting the source under each mark)."""
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem is None:
        return " ".join(str(e).split())
    where = e.problem_mark
    at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
    context = f" ({e.context})" if e.context else ""
    return f"{e.problem}{at}{context}"


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {_yaml_problem(e)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                world_size: int | None = None) -> TrainConfig:
    """Read a YAML run file (or the defaults), apply `a.b=value` overrides, validate (for `world_size`
    ranks when given: a cp_degree that does not fit them is named before the checks that depend on it)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text file (not UTF-8)") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...), "
                              f"got {type(tree).__name__} {tree!r:.60}")
    return config_from_dict(tree, overrides, world_size)


def config_from_dict(tree: dict, overrides: list[str] = (), world_size: int | None = None) -> TrainConfig:
    """A nested dict as YAML holds it (a run file, or a checkpoint's saved config) plus `a.b=value`
    overrides, validated (for `world_size` ranks when given). Fields added to lh_dist after the dict was
    written take their defaults."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping of sections (model:, data:, ...), got {type(tree).__name__} "
                          f"{tree!r:.60}")
    tree = copy.deepcopy(tree)
    for override in overrides:
        _apply_override(tree, override)
    data = tree.get("data")
    if isinstance(data, dict) and "path" in data and not data["path"] and not data.get("sources"):
        # Emptied on purpose (e.g. data.path= to switch to sources), so the default would surprise.
        raise ConfigError(f"data.path is empty and data.sources is not set: name a dataset (data.path=...) or a "
                          f"mixture (data.sources=[...]); leave both out for the default {DEFAULT_DATA_PATH}")
    cfg = _from_dict(TrainConfig, tree)
    cfg.validate(world_size)
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write every field of `cfg` as YAML, in declaration order; `load_config(path)` reads it back equal."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
