"""`lh-export`: turn a checkpoint into a Hugging Face Llama folder (config.json + model.safetensors).

    lh-export runs/tiny-cpu/checkpoints/step_00000060 --out exported/tiny
    lh-export runs/tiny-cpu --out exported/tiny          # the newest checkpoint of a run

Our RoPE pairs (x[i], x[i + D/2]) like Hugging Face's Llama, so weights map one to one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lh_dist.config import TrainConfig
from lh_dist.train.checkpoint import checkpoint_config, resolve_checkpoint
from lh_dist.train.engine import load_model_state

_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
    "ffn.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        module, param = rest.rsplit(".", 1)
        return f"model.layers.{i}.{_LAYER_NAMES[module]}.{param}"
    return {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[name]


def hf_config(cfg: TrainConfig, dtype: str) -> dict:
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m.dim, "intermediate_size": m.ffn_hidden, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
        "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "max_position_embeddings": cfg.data.seq_len, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype,
    }


def export(checkpoint: Path, out: Path, dtype: str = "float32") -> Path:
    from safetensors.torch import save_file

    checkpoint = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint)
    state = load_model_state(checkpoint)
    if cfg.model.tie_embeddings:
        state.pop("output.weight", None)
    tensors = {hf_name(k): v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lh-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder step_XXXXXXXX, or a run directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {export(args.checkpoint, args.out, args.dtype)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"lh-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
