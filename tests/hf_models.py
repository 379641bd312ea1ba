"""Tiny Hugging Face models and a tiny tokenizer for the import and export tests, built from transformers'
config classes and the `tokenizers` library (nothing is downloaded), and a float64 reference.

`save_hf_model(kind, folder)` writes a random model folder as `save_pretrained` does (config.json,
safetensors, tokenizer files); `hf_logits_float64(folder, tokens)` runs it in transformers in float64.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

EOS = "<|endoftext|>"
# A small corpus for the tokenizer's merges: Python-like text, as the stdlib dataset holds.
_CORPUS = ["def main():\n    return 0\n", "import os\nimport sys\n", "class Foo(object):\n    pass\n",
           "for i in range(10):\n    print(i)\n", "if __name__ == '__main__':\n    main()\n"] * 20

# Each kind: its config class, what it sets beyond the shared tiny shape, and the architecture's options.
KINDS = {
    "llama": ("LlamaConfig", {"rope_theta": 5000.0, "rms_norm_eps": 1e-5}),
    "llama3": ("LlamaConfig", {"rope_theta": 500000.0, "max_position_embeddings": 512, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": None, "rope_theta": 1e6}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "rope_theta": 1e6}),
    "qwen3": ("Qwen3Config", {"head_dim": 24, "rope_theta": 1e6}),
}


def save_tokenizer(folder: Path) -> "PreTrainedTokenizerFast":  # noqa: F821
    """A byte-level BPE of about 300 tokens with EOS as its end-of-text token, saved as a transformers
    fast-tokenizer folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.save_pretrained(folder)
    return fast


def hf_config(kind: str, vocab_size: int, eos_id: int, **overrides):
    """The transformers config of a tiny model of `kind` (GQA: 4 heads, 2 KV heads)."""
    import transformers

    name, options = KINDS[kind]
    shape = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    return getattr(transformers, name)(**(shape | options | overrides))


def save_hf_model(kind: str, folder: Path, dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB",
                  **overrides) -> Path:
    """A random tiny model of `kind` with the tiny tokenizer, saved into `folder` (float32 unless `dtype`;
    shards if `max_shard_size` is small). Every parameter is perturbed, norms and biases included, so that
    a mix-up of any two of them shows in the logits."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tokenizer = save_tokenizer(folder)
    config = hf_config(kind, vocab_size=320, eos_id=tokenizer.eos_token_id, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


class _Float64Torch(types.ModuleType):
    """torch, in which float and float32 name float64: transformers' RoPE init functions then compute
    their inverse frequencies in float64 by their own formulas."""

    float = torch.float64
    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def _float64_norm(norm):
    def forward(x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    return forward


def _float64_rope(rotary, config):
    from transformers import modeling_rope_utils

    saved = modeling_rope_utils.torch
    modeling_rope_utils.torch = _Float64Torch("torch")
    try:
        inv_freq, scaling = rotary.rope_init_fn(config, None)  # [D/2] float64
    finally:
        modeling_rope_utils.torch = saved

    def forward(x, position_ids):
        freqs = position_ids[:, :, None].double() * inv_freq[None, None, :]  # [B, N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, N, D]
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
    return forward


def hf_model_float64(folder: Path):
    """The saved model in transformers, in float64 throughout. transformers computes RMSNorm and RoPE in
    float32 whatever the model's dtype (about 1e-7 off float64); here both run in float64 by the same
    formulas, and attention is SDPA (its eager path takes the softmax in float32 too)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="sdpa").eval()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _float64_norm(module)
    model.model.rotary_emb.forward = _float64_rope(model.model.rotary_emb, model.config)
    return model


def lh_dist_model(run_dir: Path, overrides: list[str] = ()):
    """lh_dist's Transformer of a run directory's newest checkpoint (lh-import's step 0), with plain dense
    attention, in float64; `overrides` change its config (e.g. model.rope_theta=...)."""
    from lh_dist.model import Transformer
    from lh_dist.ops.attention import attention
    from lh_dist.checkpoint.format import checkpoint_config, load_model_state, resolve_checkpoint

    folder = resolve_checkpoint(run_dir)
    cfg = checkpoint_config(folder, overrides)
    dense = [lambda q, k, v, **scored: attention(q, k, v, causal=True, backend="math")] * cfg.model.n_layers
    model = Transformer(cfg.model, dense)
    model.load_state_dict(load_model_state(folder))
    return model.double().eval()


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory):
    """(Hugging Face folder, lh-import run dir) of a tiny Llama with the tiny tokenizer."""
    from lh_dist.hf.importer import import_model

    root = tmp_path_factory.mktemp("hf_run")
    source = save_hf_model("llama", root / "hf")
    import_model(source, root / "imported")
    return source, root / "imported"


@pytest.fixture(scope="session")
def hf_dataset(tmp_path_factory, hf_run):
    """The first standard-library sources tokenized with the imported model's tokenizer (lh-data --tokenizer
    <run_dir>/hf)."""
    from lh_dist.data.cli import main as lh_data

    out = tmp_path_factory.mktemp("data") / "stdlib-hf"
    assert lh_data(["stdlib", "--out", str(out), "--tokenizer", str(hf_run[1] / "hf"), "--max-docs", "60",
                    "--val-fraction", "0.1"]) == 0
    return out
