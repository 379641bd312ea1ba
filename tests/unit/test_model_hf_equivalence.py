"""The decoder computes what transformers computes for Llama, Mistral, Qwen2 and Qwen3 models.

Each case builds a tiny random transformers model in float64, copies its weights into a
`Transformer` through the name mapping below, and compares the logits of both on the same
tokens, at positions up to 3x the original context of the RoPE scalings. The RoPE tables are
also compared with transformers' rotary module for every scaling type.

transformers computes RMSNorm, RoPE's frequencies and angles and the attention softmax in
float32 whatever the model's dtype (a floor for bf16 runs). `transformers_in_float64` lifts
that floor while its models run, so that both sides are float64 and a difference measures
the formulas, not float32 rounding (~1e-7, which would hide any error below it).

Tolerance: float64 rounds each operation by 2^-53 ~ 1.1e-16; the two models sum in different
orders (matmuls over <= 96 terms, softmax over <= 96 keys, 2 layers), so their logits, of
magnitude ~3, differ by ~1e-14 (measured: <= 6e-15). 1e-10 leaves four orders of margin, while
any formula difference (a missing bias, a wrong eps, scaling or rotation pairing) or float32
rounding anywhere gives >= 1e-7 (measured without the lift: 5e-7 to 2e-6).
"""

import contextlib
import copy
import types

import pytest
import torch
import transformers
from transformers import modeling_rope_utils
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from lh_dist.config import ModelConfig, RopeScalingConfig
from lh_dist.hf import mapping
from lh_dist.model import Transformer, rope_tables
from lh_dist.ops.attention import attention


class _TorchWithFloat64(types.ModuleType):
    """The torch module, except that its float32 names mean float64."""

    def __getattr__(self, name):
        return torch.float64 if name in ("float32", "float") else getattr(torch, name)


@contextlib.contextmanager
def transformers_in_float64():
    """transformers' Llama, Mistral, Qwen2, Qwen3 and RoPE code with their float32 casts made float64."""
    shim = _TorchWithFloat64("torch")
    with pytest.MonkeyPatch.context() as mp:
        for module in (modeling_llama, modeling_mistral, modeling_qwen2, modeling_qwen3, modeling_rope_utils):
            mp.setattr(module, "torch", shim)
        # The rotary modules call Tensor.float() on their frequencies and positions.
        mp.setattr(torch.Tensor, "float", torch.Tensor.double)
        yield


# transformers' parameter names -> ours (applied in order, as substring replacements).
HF_TO_OURS = [
    ("model.embed_tokens.", "embed."), ("model.norm.", "norm."), ("lm_head.", "output."),
    ("model.layers.", "layers."), ("input_layernorm.", "attention_norm."), ("post_attention_layernorm.", "ffn_norm."),
    ("self_attn.q_proj.", "attention.wq."), ("self_attn.k_proj.", "attention.wk."),
    ("self_attn.v_proj.", "attention.wv."), ("self_attn.o_proj.", "attention.wo."),
    ("self_attn.q_norm.", "attention.q_norm."), ("self_attn.k_norm.", "attention.k_norm."),
    ("mlp.gate_proj.", "ffn.w1."), ("mlp.up_proj.", "ffn.w3."), ("mlp.down_proj.", "ffn.w2."),
]


def ours_from_hf_name(name: str) -> str:
    for theirs, ours in HF_TO_OURS:
        name = name.replace(theirs, ours)
    return name


def rope_scaling_from_hf(hf_cfg) -> RopeScalingConfig:
    """transformers' rope_scaling dict as our section (yarn's context defaults to max_position_embeddings)."""
    scaling = dict(getattr(hf_cfg, "rope_scaling", None) or {})
    kind = scaling.pop("rope_type", "default")
    scaling.pop("type", None)
    if kind == "default":
        return RopeScalingConfig()
    if kind == "yarn":
        scaling.setdefault("original_max_position_embeddings", hf_cfg.max_position_embeddings)
    return RopeScalingConfig(type=kind, **scaling)


def model_config_from_hf(hf_cfg, attention_bias: bool, qk_norm: bool) -> ModelConfig:
    cfg = ModelConfig(
        dim=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers, n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=hf_cfg.num_key_value_heads, head_dim=getattr(hf_cfg, "head_dim", None) or 0,
        ffn_hidden=hf_cfg.intermediate_size,
        vocab_size=hf_cfg.vocab_size, rope_theta=hf_cfg.rope_theta, rope_scaling=rope_scaling_from_hf(hf_cfg),
        norm_eps=hf_cfg.rms_norm_eps, attention_bias=attention_bias, qk_norm=qk_norm,
        tie_embeddings=hf_cfg.tie_word_embeddings, attention_backend="math")
    cfg.validate()
    return cfg


CONTEXT = 32  # the original context of the scalings; the tests run to 3x beyond it
SEQ_LEN = 96
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": CONTEXT}
LINEAR = {"rope_type": "linear", "factor": 3.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": CONTEXT}
SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4 * CONTEXT, rms_norm_eps=1e-6)

# (hf class, its config, attention_bias, qk_norm); every case has GQA (4 query heads, 2 KV heads).
CASES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**SHAPE, rope_theta=500000.0), False, False),
    "llama-llama3": (transformers.LlamaForCausalLM,
                     transformers.LlamaConfig(**SHAPE, rope_theta=10000.0, rope_scaling=LLAMA3), False, False),
    "llama-linear": (transformers.LlamaForCausalLM,
                     transformers.LlamaConfig(**SHAPE, rope_theta=10000.0, rope_scaling=LINEAR), False, False),
    "llama-yarn": (transformers.LlamaForCausalLM,
                   transformers.LlamaConfig(**SHAPE, rope_theta=10000.0, rope_scaling=YARN), False, False),
    "qwen2-bias-tied": (transformers.Qwen2ForCausalLM,
                        transformers.Qwen2Config(**SHAPE, rope_theta=1000000.0, tie_word_embeddings=True), True, False),
    "qwen3-qknorm-headdim": (transformers.Qwen3ForCausalLM,
                             transformers.Qwen3Config(**SHAPE, head_dim=24, rope_theta=1000000.0), False, True),
    "qwen3-yarn": (transformers.Qwen3ForCausalLM,
                   transformers.Qwen3Config(**SHAPE, head_dim=24, rope_theta=10000.0, rope_scaling=YARN), False, True),
    "mistral": (transformers.MistralForCausalLM,
                transformers.MistralConfig(**SHAPE, head_dim=16, sliding_window=None, rope_theta=1000000.0),
                False, False),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm gains around 1, biases around 0), so that none is left untested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise if name.endswith("bias") else 0.1 * noise)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(case):
    hf_class, hf_cfg, attention_bias, qk_norm = CASES[case]
    hf_cfg._attn_implementation = "eager"
    with transformers_in_float64():
        hf = hf_class(hf_cfg).to(torch.float64).eval()
    _randomize(hf, seed=0)

    cfg = model_config_from_hf(hf_cfg, attention_bias, qk_norm)
    def dense(q, k, v, **scored):  # a QK-norm model passes the vectors to score too
        return attention(q, k, v, causal=True, backend="math")

    ours = Transformer(cfg, [dense] * cfg.n_layers).to(torch.float64)
    weights = {ours_from_hf_name(k): v for k, v in hf.state_dict().items()}
    assert set(weights) == set(ours.state_dict()), "parameter names differ"
    ours.load_state_dict(weights)

    tokens = torch.randint(0, hf_cfg.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), transformers_in_float64():
        expected = hf(input_ids=tokens).logits
    with torch.no_grad():
        got = ours(tokens, torch.arange(SEQ_LEN))
    assert got.dtype == torch.float64 and expected.dtype == torch.float64
    assert expected.abs().max() > 1  # logits of substance, not a vanishing signal
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-10, f"{case}: max |logit difference| {diff:.3g}"


def test_parameter_names_of_the_options():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=24, attention_bias=True, qk_norm=True)
    names = {n: p.shape for n, p in Transformer(cfg, [None]).named_parameters()}
    assert {n: names[n] for n in names if n.startswith("layers.0.attention.")} == {
        "layers.0.attention.wq.weight": (96, 64), "layers.0.attention.wq.bias": (96,),
        "layers.0.attention.wk.weight": (48, 64), "layers.0.attention.wk.bias": (48,),
        "layers.0.attention.wv.weight": (48, 64), "layers.0.attention.wv.bias": (48,),
        "layers.0.attention.wo.weight": (64, 96),
        "layers.0.attention.q_norm.weight": (24,), "layers.0.attention.k_norm.weight": (24,)}
    plain = {n for n, _ in Transformer(ModelConfig(n_layers=1), [None]).named_parameters()}
    assert not any(n.endswith(("bias", "q_norm.weight", "k_norm.weight")) for n in plain)


def test_fresh_biases_are_zero_and_qk_norm_gains_one():
    model = Transformer(ModelConfig(n_layers=1, attention_bias=True, qk_norm=True), [None])
    a = model.layers[0].attention
    assert all((m.bias == 0).all() for m in (a.wq, a.wk, a.wv))
    assert (a.q_norm.weight == 1).all() and (a.k_norm.weight == 1).all()


# rope_scaling of transformers -> what else to check in our tables
ROPE_SCALINGS = {
    "default": None,
    "linear": LINEAR,
    "llama3": LLAMA3,
    "yarn": YARN,
    "yarn-mscale": {**YARN, "mscale": 0.9, "mscale_all_dim": 0.6, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn-attention-factor": {**YARN, "attention_factor": 1.3},
    "yarn-no-truncate": {**YARN, "truncate": False},
}


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
@pytest.mark.parametrize("head_dim", [16, 24])
def test_rope_tables_equal_transformers_rotary_embedding(scaling, head_dim):
    hf_cfg = transformers.LlamaConfig(**SHAPE, head_dim=head_dim, rope_theta=10000.0,
                                      rope_scaling=ROPE_SCALINGS[scaling])
    cfg = model_config_from_hf(hf_cfg, attention_bias=False, qk_norm=False)
    # Beyond the original context: the full range to 8x, and a zigzag shard's two runs.
    for positions in (torch.arange(8 * CONTEXT), torch.cat([torch.arange(40, 56), torch.arange(200, 216)])):
        with transformers_in_float64():
            rotary = modeling_llama.LlamaRotaryEmbedding(hf_cfg)
            hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float64), positions[None])  # [1, N, D]
        cos, sin = rope_tables(positions, cfg)  # [N, D/2]
        assert cos.dtype == torch.float64 and hf_cos.dtype == torch.float64
        for ours, theirs in ((cos, hf_cos[0]), (sin, hf_sin[0])):
            full = torch.cat([ours, ours], dim=-1)  # transformers repeats the D/2 angles over both halves
            relative = ((full - theirs).abs().max() / theirs.abs().max()).item()
            assert relative <= 1e-12, f"{scaling}: relative difference {relative:.3g}"
    if scaling != "default":  # the scaling took effect: the tables differ from plain RoPE
        plain, _ = rope_tables(positions, ModelConfig(head_dim=head_dim, rope_theta=10000.0))
        assert (cos - plain).abs().max() > 1e-3


@pytest.mark.parametrize("scaling", [s for s in ROPE_SCALINGS if s != "default"])
def test_exported_and_reimported_rope_scaling_computes_the_same_tables(scaling):
    """lh-export's config.json, read by transformers, rotates as our model does; lh-import reads it back to
    the same tables (yarn's mscale pair, attention factor and truncate included)."""
    hf_cfg = transformers.LlamaConfig(**SHAPE, head_dim=16, rope_theta=10000.0, rope_scaling=ROPE_SCALINGS[scaling])
    cfg = model_config_from_hf(hf_cfg, attention_bias=False, qk_norm=False)
    exported = mapping.hf_config(cfg, dtype="float32", context=8 * CONTEXT, special_ids={})
    positions = torch.arange(8 * CONTEXT)
    cos, sin = rope_tables(positions, cfg)  # [N, D/2]
    with transformers_in_float64():
        rotary = modeling_llama.LlamaRotaryEmbedding(transformers.LlamaConfig.from_dict(copy.deepcopy(exported)))
        hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float64), positions[None])  # [1, N, D]
    for ours, theirs in ((cos, hf_cos[0]), (sin, hf_sin[0])):
        relative = ((torch.cat([ours, ours], dim=-1) - theirs).abs().max() / theirs.abs().max()).item()
        assert relative <= 1e-12, f"{scaling}: relative difference {relative:.3g}"
    section = mapping.model_section(exported)["rope_scaling"]
    back = ModelConfig(head_dim=16, rope_theta=10000.0, rope_scaling=RopeScalingConfig(**section))
    for ours, again in zip((cos, sin), rope_tables(positions, back)):
        assert torch.equal(ours, again), scaling
