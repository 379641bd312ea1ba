"""The one mapping between Hugging Face causal LMs and lh_dist's decoder, used by import and export.

Parameter names: ours `layers.3.attention.wq.weight` is theirs `model.layers.3.self_attn.q_proj.weight`
(table below). RoPE pairs (x[i], x[i + D/2]) on both sides, so weights map one to one.

Config: `model_section(config.json)` gives lh_dist's `model` section, and `hf_config` writes a
config.json back. Accepted architectures (`ARCHITECTURES`): Llama (RoPE scaling none, linear,
llama3 or yarn), Mistral without a sliding window, Qwen2 (q/k/v biases) without a sliding window,
Qwen3 (per-head q/k norms). Anything else that lh_dist's model cannot compute exactly is refused
with `UnsupportedModel`, one line naming the key: other architectures, mixture-of-experts keys, a
sliding window, other RoPE types, an activation other than SiLU, MLP biases, an output-projection
bias, and every key that is neither understood here nor on the explicit list of keys known not to
change what the model computes (`HARMLESS_KEYS`).

A run made by `lh-import` keeps what the way back needs in `<run_dir>/hf/`: the tokenizer files and
`origin.json` (`read_origin`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lh_dist.config import ModelConfig, RopeScalingConfig

# Architecture class -> model_type; the mapping covers exactly these.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}

# Where a run keeps its Hugging Face origin: <run_dir>/hf/ with these files (those the model had).
HF_DIR = "hf"
ORIGIN = "origin.json"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
    "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_HF_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_BIASED = ("attention.wq", "attention.wk", "attention.wv")  # the projections that may have a bias
_HF_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}
# Buffers that older checkpoints saved beside the weights; recomputed from the config, never read.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)

# transformers' defaults (its config classes) for the keys read here, used where config.json lacks one.
# None for num_key_value_heads and head_dim means "as many as attention heads" and "hidden_size / heads".
_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048},
    "mistral": {"num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 4096 * 32,
                "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "head_dim": None, "max_position_embeddings": 32768},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768},
}
_COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
                    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "use_sliding_window": False,
                    "sliding_window": None, "layer_types": None}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Keys each architecture defines that the mapping reads (and checks), beyond the common ones.
_READ_KEYS = ("architectures", "model_type", *_REQUIRED, "num_key_value_heads", "head_dim", "rms_norm_eps",
              "rope_theta", "rope_scaling", "tie_word_embeddings", "hidden_act", "max_position_embeddings")
_ARCH_KEYS = {
    "llama": ("attention_bias", "mlp_bias"),
    "mistral": ("sliding_window",),
    "qwen2": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
    "qwen3": ("attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
}

# Keys that do not change what the model computes: identity, special ids, storage, generation and
# housekeeping settings of transformers. Any other key not read above is refused by name.
HARMLESS_KEYS = frozenset({
    "transformers_version", "dtype", "torch_dtype", "use_cache", "initializer_range", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "unk_token_id", "decoder_start_token_id", "_name_or_path",
    "_model_name_or_path", "tokenizer_class",
    # Slices the matmuls of some older Llama code into as many parts; the sum is the same.
    "pretraining_tp", "is_decoder", "use_bfloat16", "output_attentions", "output_hidden_states", "return_dict",
    "torchscript", "id2label", "label2id", "problem_type", "finetuning_task", "task_specific_params", "prefix",
    "chunk_size_feed_forward", "tie_encoder_decoder", "cross_attention_hidden_size", "tf_legacy_loss",
    "_attn_implementation_autoset", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})
# Keys harmless at one value only (the value transformers' classes default to).
_HARMLESS_AT = {"attention_dropout": 0.0, "add_cross_attention": False, "is_encoder_decoder": False,
                "pruned_heads": {}, "partial_rotary_factor": 1.0}
_MOE_KEYS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
             "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef",
             "output_router_logits", "norm_topk_prob", "router_jitter_noise")

# RoPE scaling types of lh_dist's model and the parameters each reads (transformers' names).
ROPE_PARAMS = {
    "none": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    # attention_factor resolved (from mscale and mscale_all_dim where a config gives those instead).
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate"),
}


class UnsupportedModel(ValueError):
    """A Hugging Face model that lh_dist's decoder cannot compute exactly; the message names the key."""


# ---- parameter names -----------------------------------------------------------------------

def hf_name(name: str) -> str:
    """transformers' name of one of our parameters: layers.0.attention.wq.weight ->
    model.layers.0.self_attn.q_proj.weight."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        module, param = rest.rsplit(".", 1)
        return f"model.layers.{i}.{_LAYER_NAMES[module]}.{param}"
    return _TOP_NAMES[name]


def our_name(name: str) -> str | None:
    """Our name of a transformers parameter (the inverse of `hf_name`); None if it has none."""
    if name.startswith("model.layers."):
        parts = name.split(".", 3)
        if len(parts) < 4 or not parts[2].isdigit() or "." not in parts[3]:
            return None
        module, param = parts[3].rsplit(".", 1)
        ours = _HF_LAYER_NAMES.get(module)
        if ours is None or param not in ("weight", "bias") or (param == "bias" and ours not in _BIASED):
            return None
        return f"layers.{parts[2]}.{ours}.{param}"
    return _HF_TOP_NAMES.get(name)


def parameter_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of the decoder that a `model` section (as `model_section` returns it)
    describes, with its shape: what an import must find, no more, no less."""
    m = canonical(model)
    e, d, f = m["dim"], m["head_dim"], m["ffn_hidden"]
    q, kv = m["n_heads"] * d, m["n_kv_heads"] * d
    shapes = {"embed.weight": (m["vocab_size"], e), "norm.weight": (e,), "output.weight": (m["vocab_size"], e)}
    for i in range(m["n_layers"]):
        p = f"layers.{i}."
        shapes |= {p + "attention.wq.weight": (q, e), p + "attention.wk.weight": (kv, e),
                   p + "attention.wv.weight": (kv, e), p + "attention.wo.weight": (e, q),
                   p + "ffn.w1.weight": (f, e), p + "ffn.w3.weight": (f, e), p + "ffn.w2.weight": (e, f),
                   p + "attention_norm.weight": (e,), p + "ffn_norm.weight": (e,)}
        if m["attention_bias"]:
            shapes |= {p + "attention.wq.bias": (q,), p + "attention.wk.bias": (kv,), p + "attention.wv.bias": (kv,)}
        if m["qk_norm"]:
            shapes |= {p + "attention.q_norm.weight": (d,), p + "attention.k_norm.weight": (d,)}
    return shapes


# ---- config: Hugging Face -> lh_dist ---------------------------------------------------------

def _refuse(key: str, value, why: str):
    raise UnsupportedModel(f"config.json: {key}={json.dumps(value)}: {why}")


def architecture(config: dict) -> str:
    """The accepted architecture class that config.json names; UnsupportedModel otherwise."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        _refuse("architectures", archs, f"expected one of {', '.join(ARCHITECTURES)}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        _refuse("architectures", archs, f"lh_dist imports {', '.join(ARCHITECTURES)}")
    if config.get("model_type") != ARCHITECTURES[arch]:
        _refuse("model_type", config.get("model_type"), f"{arch} has model_type {ARCHITECTURES[arch]!r}")
    return arch


def _value(config: dict, key: str):
    kind = config["model_type"]
    return config[key] if key in config else _DEFAULTS[kind].get(key, _COMMON_DEFAULTS.get(key))


def _check_keys(config: dict, kind: str) -> None:
    for key in _MOE_KEYS:
        if key in config:
            _refuse(key, config[key], "a mixture-of-experts key; lh_dist's feed-forward is one dense SwiGLU")
    known = set(_READ_KEYS) | set(_ARCH_KEYS[kind])
    for key, value in config.items():
        if key in known or key in HARMLESS_KEYS:
            continue
        if key in _HARMLESS_AT:
            if value != _HARMLESS_AT[key]:
                _refuse(key, value, f"lh_dist's model computes it as {json.dumps(_HARMLESS_AT[key])} only")
            continue
        _refuse(key, value, "unknown to lh_dist's import (it may change what the model computes; the keys known "
                            "to be harmless are listed in lh_dist/hf/mapping.py)")
    for key in _REQUIRED:
        if not isinstance(config.get(key), int) or isinstance(config.get(key), bool) or config[key] <= 0:
            _refuse(key, config.get(key), "expected a positive integer")


def _check_attention(config: dict, kind: str) -> None:
    if _value(config, "hidden_act") != "silu":
        _refuse("hidden_act", config["hidden_act"], "lh_dist's feed-forward is SwiGLU with SiLU only")
    if _value(config, "mlp_bias"):
        _refuse("mlp_bias", True, "lh_dist's feed-forward has no biases")
    if kind in ("llama", "qwen3") and _value(config, "attention_bias"):
        _refuse("attention_bias", True, f"{kind} puts a bias on o_proj too; lh_dist's model has q/k/v biases only")
    if kind == "mistral" and _value(config, "sliding_window") is not None:
        _refuse("sliding_window", _value(config, "sliding_window"),
                "lh_dist's model attends to the whole sequence (Mistral needs sliding_window null)")
    if kind in ("qwen2", "qwen3"):
        if _value(config, "use_sliding_window"):
            _refuse("use_sliding_window", True, "lh_dist's model attends to the whole sequence")
        layer_types = _value(config, "layer_types")
        if layer_types is not None and set(layer_types) != {"full_attention"}:
            _refuse("layer_types", layer_types, "lh_dist's model has full attention in every layer")


def _rope_scaling(config: dict) -> dict:
    """The `model.rope_scaling` section for config.json's rope_scaling, every parameter explicit (the
    defaults transformers applies are written out, so nothing depends on max_position_embeddings)."""
    scaling = _value(config, "rope_scaling")
    if scaling is None:
        return {"type": "none"}
    if not isinstance(scaling, dict):
        _refuse("rope_scaling", scaling, "expected null or a mapping")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        kind = "none"
    if kind not in ROPE_PARAMS:
        _refuse("rope_scaling.rope_type", kind, f"lh_dist's RoPE scaling is one of {', '.join(ROPE_PARAMS)}")
    extra = ("mscale", "mscale_all_dim", "truncate") if kind == "yarn" else ()
    for key, value in scaling.items():
        if key not in ("rope_type", "type", *ROPE_PARAMS[kind], *extra):
            _refuse(f"rope_scaling.{key}", value, f"not a parameter of {kind} RoPE scaling in lh_dist's model")
    out = {"type": kind}
    required = ROPE_PARAMS[kind] if kind in ("linear", "llama3") else ("factor",)
    for key in required:
        if not isinstance(scaling.get(key), (int, float)) or isinstance(scaling.get(key), bool):
            _refuse(f"rope_scaling.{key}", scaling.get(key), f"{kind} RoPE scaling needs a number")
        out[key] = scaling[key]
    if kind == "yarn":
        if not isinstance(scaling.get("truncate", True), bool):
            _refuse("rope_scaling.truncate", scaling["truncate"], "expected true or false")
        out |= {"original_max_position_embeddings": (scaling.get("original_max_position_embeddings")
                                                     or _value(config, "max_position_embeddings")),
                "beta_fast": scaling.get("beta_fast") or 32, "beta_slow": scaling.get("beta_slow") or 1,
                "attention_factor": _yarn_factor(scaling), "truncate": scaling.get("truncate", True)}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor"):
        if key in out:
            out[key] = float(out[key])
    return out


def _yarn_factor(scaling: dict) -> float:
    """The attention factor a yarn rope_scaling (either side's names) comes to, resolved as the model does."""
    fields = ("factor", "attention_factor", "mscale", "mscale_all_dim")
    return float(RopeScalingConfig(type="yarn", **{k: scaling.get(k) or 0.0 for k in fields}).yarn_attention_factor())


def model_section(config: dict) -> dict:
    """lh_dist's `model` section for a Hugging Face config.json (a dict), with only the fields whose value
    differs from ModelConfig's defaults among the options real models add (head_dim, attention_bias, qk_norm,
    rope_scaling). UnsupportedModel (one line naming the key) for anything it cannot represent exactly."""
    kind = ARCHITECTURES[architecture(config)]
    _check_keys(config, kind)
    _check_attention(config, kind)
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    n_kv_heads = _value(config, "num_key_value_heads") or n_heads
    head_dim = _value(config, "head_dim") or dim // n_heads
    if n_heads % n_kv_heads:
        _refuse("num_key_value_heads", n_kv_heads, f"must divide num_attention_heads={n_heads}")
    if not _value(config, "head_dim") and dim % n_heads:
        _refuse("hidden_size", dim, f"must be divisible by num_attention_heads={n_heads} when head_dim is not given")
    section = {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads, "n_kv_heads": n_kv_heads,
               "ffn_hidden": config["intermediate_size"], "vocab_size": config["vocab_size"],
               "rope_theta": float(_value(config, "rope_theta")), "norm_eps": float(_value(config, "rms_norm_eps")),
               "tie_embeddings": bool(_value(config, "tie_word_embeddings"))}
    if head_dim != dim // n_heads:
        section["head_dim"] = head_dim
    if kind == "qwen2":  # Qwen2's q/k/v projections always have biases (its o_proj none)
        section["attention_bias"] = True
    if kind == "qwen3":  # Qwen3 normalizes each head of q and k before RoPE
        section["qk_norm"] = True
    scaling = _rope_scaling(config)
    if scaling["type"] != "none":
        section["rope_scaling"] = scaling
    return section


def max_position_embeddings(config: dict) -> int:
    """The context length config.json declares (transformers' default for the architecture if absent)."""
    return int(_value(config, "max_position_embeddings"))


def canonical(model: dict) -> dict:
    """A `model` section with every field the mapping knows explicit: head_dim resolved, the options at their
    defaults where absent, rope_scaling reduced to the parameters of its type. Comparable between sources."""
    out = {k: model[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size",
                                 "rope_theta", "norm_eps", "tie_embeddings")}
    out["head_dim"] = model.get("head_dim") or model["dim"] // model["n_heads"]
    out["attention_bias"] = bool(model.get("attention_bias", False))
    out["qk_norm"] = bool(model.get("qk_norm", False))
    scaling = model.get("rope_scaling") or {"type": "none"}
    kind = scaling.get("type", "none")
    out["rope_scaling"] = {"type": kind, **{k: scaling.get(k) for k in ROPE_PARAMS[kind]}}
    if kind == "yarn":
        out["rope_scaling"] |= {"attention_factor": _yarn_factor(scaling), "truncate": scaling.get("truncate", True)}
    return out


def section_of(model: ModelConfig) -> dict:
    """A ModelConfig as a `model` section (`canonical` form)."""
    fields = dataclasses.asdict(model)
    fields["head_dim"] = model.head_dim  # the resolved width
    return canonical(fields)


# ---- config: lh_dist -> Hugging Face ---------------------------------------------------------

def _hf_rope_scaling(scaling: dict):
    if scaling["type"] == "none":
        return None
    # A parameter left at 0 or unset means "transformers' default", which is what it derives anyway; yarn's
    # attention factor comes resolved, and its truncate is written where it is not the default (true).
    kept = {k: v for k, v in scaling.items() if k not in ("type", "truncate") and v}
    return {"rope_type": scaling["type"], **kept, **({"truncate": False} if scaling.get("truncate") is False else {})}


def _architecture_for(m: dict) -> str:
    if m["qk_norm"] and not m["attention_bias"]:
        return "Qwen3ForCausalLM"
    if m["attention_bias"] and not m["qk_norm"]:
        return "Qwen2ForCausalLM"
    if m["attention_bias"] or m["qk_norm"]:
        raise ValueError("no accepted Hugging Face architecture has both q/k/v biases and q/k norms")
    return "LlamaForCausalLM"


def hf_config(model: ModelConfig, *, dtype: str, context: int, special_ids: dict, origin: dict | None = None) -> dict:
    """config.json for a model of lh_dist's shape.

    With `origin` (the origin.json of an import), the imported config.json comes back unchanged but for
    what a run may change: rope_theta and rope_scaling (written in the run's values where they differ;
    a yarn rope_scaling always with its original_max_position_embeddings), max_position_embeddings
    (raised to `context` if the run trained on longer sequences) and the dtype.
    Without, the architecture follows the model's options (Llama; Qwen2 with q/k/v biases; Qwen3 with q/k
    norms) and `special_ids` (bos/eos/pad) are written. ValueError if the model is not the origin's shape."""
    ours = section_of(model)
    if origin is not None:
        config = dict(origin["config"])
        theirs = canonical(model_section(config))
        differ = [k for k in ours if k not in ("rope_theta", "rope_scaling") and ours[k] != theirs[k]]
        if differ:
            raise ValueError(f"the model is not the one hf/{ORIGIN} describes: model.{differ[0]} is "
                             f"{ours[differ[0]]!r}, {theirs[differ[0]]!r} there")
        if ours["rope_theta"] != theirs["rope_theta"]:
            config["rope_theta"] = ours["rope_theta"]
        if ours["rope_scaling"] != theirs["rope_scaling"]:
            config["rope_scaling"] = _hf_rope_scaling(ours["rope_scaling"])
        if ours["rope_scaling"]["type"] == "yarn":
            # transformers' yarn takes max_position_embeddings, raised below, for the context before scaling
            # where rope_scaling does not name it. (llama3 always names it; linear reads neither.)
            config["rope_scaling"] = {**config["rope_scaling"], "original_max_position_embeddings":
                                      ours["rope_scaling"]["original_max_position_embeddings"]}
        if context > max_position_embeddings(config):
            config["max_position_embeddings"] = context
        config["dtype" if "dtype" in config else "torch_dtype"] = dtype
        return config
    arch = _architecture_for(ours)
    config = {
        "architectures": [arch], "model_type": ARCHITECTURES[arch],
        "hidden_size": ours["dim"], "intermediate_size": ours["ffn_hidden"], "num_hidden_layers": ours["n_layers"],
        "num_attention_heads": ours["n_heads"], "num_key_value_heads": ours["n_kv_heads"],
        "head_dim": ours["head_dim"], "vocab_size": ours["vocab_size"], "rms_norm_eps": ours["norm_eps"],
        "rope_theta": ours["rope_theta"], "rope_scaling": _hf_rope_scaling(ours["rope_scaling"]),
        "max_position_embeddings": context, "tie_word_embeddings": ours["tie_embeddings"], "hidden_act": "silu",
        "torch_dtype": dtype, **special_ids,
    }
    if arch == "LlamaForCausalLM":
        config |= {"attention_bias": False, "mlp_bias": False}
    if arch == "Qwen3ForCausalLM":
        config["attention_bias"] = False
    if arch != "LlamaForCausalLM":
        config["use_sliding_window"] = False
    return config


# ---- a run's origin ---------------------------------------------------------------------------

def read_origin(run_dir: str | Path) -> dict | None:
    """<run_dir>/hf/origin.json: {"architecture", "model_type", "source", "config" (the imported
    config.json), "tokenizer" (its identity)}, or None for a run that was not imported."""
    path = Path(run_dir) / HF_DIR / ORIGIN
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
