"""`lh-export`: turn a checkpoint into a Hugging Face Llama folder that `transformers` uses as is.

    lh-export runs/tiny-cpu --out exported/tiny                           # the newest checkpoint of a run
    lh-export runs/tiny-cpu/checkpoints/step_00000060 --out exported/tiny --dtype bfloat16

The folder holds config.json and generation_config.json (with the end-of-document token as
eos, bos and pad), model.safetensors, the tokenizer (tokenizer.json + tokenizer_config.json),
README.md (a model card: shape, phases, tokens, final losses) and lh_dist_config.yaml (the
training config). Every file is readable by all (0644), for shared storage. Then:

    from transformers import pipeline
    pipeline("text-generation", model="exported/tiny")("def main():", max_new_tokens=40)

Our RoPE pairs (x[i], x[i + D/2]) like Hugging Face's Llama, so weights map one to one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from lh_dist.config import TrainConfig, save_config
from lh_dist.runtime.checkpoint import (STEP_DIR, checkpoint_config, load_model_state, resolve_checkpoint,
                                        trainer_state)

DTYPES = ("float32", "bfloat16", "float16")
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "README.md", "lh_dist_config.yaml")
EOD_TOKEN = "<|endoftext|>"  # the byte tokenizer's end-of-document id 256, by its usual name
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
    "ffn.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(name: str) -> str:
    """The Hugging Face Llama name of one of our parameters, e.g. layers.0.attention.wq.weight ->
    model.layers.0.self_attn.q_proj.weight."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        module, param = rest.rsplit(".", 1)
        return f"model.layers.{i}.{_LAYER_NAMES[module]}.{param}"
    return {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[name]


def hf_config(cfg: TrainConfig, dtype: str, eod_id: int) -> dict:
    """config.json of the export: a LlamaForCausalLM of the run's shape, weights saved in `dtype`."""
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m.dim, "intermediate_size": m.ffn_hidden, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
        "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "max_position_embeddings": cfg.data.seq_len, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype,
        # Documents are separated by one end-of-document token: it starts, ends and pads them.
        "bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": eod_id,
    }


def generation_config(eod_id: int) -> dict:
    """generation_config.json: the end-of-document id begins, ends and pads generated text."""
    return {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": eod_id}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's; `tokenizers`' ByteLevel uses it):
    printable Latin-1 bytes stand for themselves, the other bytes for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_files(eod_id: int = 256) -> dict[str, dict]:
    """tokenizer.json and tokenizer_config.json of the byte tokenizer: id b is byte b of the UTF-8 text,
    `eod_id` is EOD_TOKEN. A byte-level BPE without merges, so encoding and decoding are exact."""
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eod_id, "content": EOD_TOKEN, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": _tokenizer_config(EOD_TOKEN, bos=True)}


def _tokenizer_config(eod_token: str, bos: bool) -> dict:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_token, "pad_token": eod_token,
              # Decoding must give back the text exactly, spaces before punctuation included.
              "clean_up_tokenization_spaces": False, "model_max_length": 10**9}
    if bos:
        config["bos_token"] = eod_token
    return config


def _write_tokenizer(out: Path, spec: str, eod_id: int) -> None:
    """The training tokenizer: the byte tokenizer, or a copy of the tokenizer.json it was read from."""
    if spec == "byte":
        for name, content in byte_tokenizer_files(eod_id).items():
            (out / name).write_text(json.dumps(content, indent=1, ensure_ascii=False))
        return
    from lh_dist.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec)
    shutil.copyfile(spec, out / "tokenizer.json")
    config = _tokenizer_config(tokenizer.eod_token, bos=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))


def model_card(cfg: TrainConfig, folder: Path, state: dict, n_params: int, tokenizer: str) -> str:
    """README.md of the export: what the model is and how it was trained, from the config and the
    checkpoint's trainer state (older checkpoints lack tokens and losses; those rows are left out)."""
    step = int(STEP_DIR.match(folder.name).group(1))
    lh, s = cfg.lighthouse, cfg.schedule
    lighthouse_steps = min(step, s.lighthouse_steps)
    run = folder.parent.parent.name
    rows = [("steps", f"{step:,} of {s.steps:,} planned")]
    if lighthouse_steps:
        rows.append(("Lighthouse phase", f"steps 1-{lighthouse_steps:,}: levels {lh.levels}, pooling {lh.pooling}, "
                                         f"top-k {lh.topk}; layers {lh.dense_layers} always dense"))
    if step > lighthouse_steps:
        rows.append(("dense phase", f"steps {lighthouse_steps + 1:,}-{step:,}"))
    if state.get("tokens_seen"):
        rows.append(("tokens", f"{state['tokens_seen']:,} ({state['tokens_seen'] // step:,} per step, "
                               f"sequences of {cfg.data.seq_len:,})"))
    if state.get("train_loss"):
        first, last, loss = state["train_loss"]
        steps = f"step {last:,}" if first == last else f"mean of steps {first:,}-{last:,}"
        rows.append(("final train loss", f"{loss:.4f} nats/token ({steps})"))
    if state.get("val_loss"):
        rows.append(("final validation loss", f"{state['val_loss'][1]:.4f} nats/token (step {state['val_loss'][0]:,})"))
    rows += [("data", f"`{cfg.data.path}`, tokenizer `{tokenizer}`"),
             ("optimizer", f"AdamW, lr {cfg.optim.lr:g}, {s.decay} schedule after {s.warmup_steps} warmup steps, "
                           f"weight decay {cfg.optim.weight_decay:g}, clipping {cfg.optim.grad_clip:g}")]
    m = cfg.model
    ended_sparse = state.get("phase") == "lighthouse"
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [lh_dist, llama]", "---", "",
        f"# {run}, step {step:,}", "",
        f"A {n_params / 1e6:.1f}M-parameter Llama-style decoder ({m.n_layers} layers, width {m.dim}, {m.n_heads} "
        f"heads, {m.n_kv_heads} KV heads, vocabulary {m.vocab_size}) trained with lh_dist"
        + (f": Lighthouse attention (arXiv 2605.06554) for {lighthouse_steps:,} steps, then dense attention."
           if lighthouse_steps else ", dense attention throughout.")
        + " `transformers` runs every layer dense."
        + (" This checkpoint was written during the Lighthouse phase, before any dense training." if ended_sparse
           else ""), "",
        "## Training", "", "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
        "The full training configuration: [lh_dist_config.yaml](lh_dist_config.yaml). "
        f"Exported from `{folder}`.", "",
        "## Use", "", "```python", "from transformers import pipeline", "",
        'generate = pipeline("text-generation", model="path/to/this/folder")',
        'print(generate("def main():", max_new_tokens=64)[0]["generated_text"])', "```", "",
        f"Documents are separated by `{EOD_TOKEN if tokenizer == 'byte' else 'the end-of-document token'}`, "
        "the eos token: generation stops there.",
    ]
    if tokenizer == "byte":
        lines[-1] += (f" Token ids 0-255 are the bytes of the UTF-8 text and id 256 is `{EOD_TOKEN}`; "
                      "decoding gives back the text exactly.")
    return "\n".join(lines) + "\n"


def export(checkpoint: Path, out: Path, dtype: str = "float32", tokenizer: str | None = None) -> Path:
    """Write the Hugging Face folder `out` from a checkpoint folder or a run directory's newest checkpoint.

    tokenizer: "byte" or a tokenizer.json; default: the one recorded in the training dataset.
    """
    from safetensors.torch import save_file

    from lh_dist.data.loader import read_dataset_info
    from lh_dist.data.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    checkpoint = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint)
    if tokenizer is None:
        try:
            tokenizer = read_dataset_info(cfg.data.path).get("tokenizer", "byte")
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"cannot tell the training tokenizer ({e}); pass --tokenizer") from None
    eod_id = load_tokenizer(tokenizer).eod_id
    state = load_model_state(checkpoint)
    n_params = sum(v.numel() for v in state.values())
    if cfg.model.tie_embeddings:
        state.pop("output.weight", None)
    tensors = {hf_name(k): v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype, eod_id), indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(eod_id), indent=2))
    _write_tokenizer(out, tokenizer, eod_id)
    save_config(cfg, out / "lh_dist_config.yaml")
    (out / "README.md").write_text(model_card(cfg, checkpoint, trainer_state(checkpoint), n_params, tokenizer))
    # safetensors writes its file for the owner only; an export is meant to be shared.
    out.chmod(0o755)
    for name in EXPORT_FILES:
        (out / name).chmod(0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    """`lh-export`; 0 on success, 2 (one line on stderr) for a missing checkpoint or a bad argument."""
    parser = argparse.ArgumentParser(prog="lh-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="checkpoint folder step_XXXXXXXX, or a run directory (its newest checkpoint)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to write (created if missing; files of the same name are replaced)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the saved weights (default: float32, as trained)")
    parser.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the tokenizer recorded in the "
                                            "training dataset's lh_data.json)")
    args = parser.parse_args(argv)
    try:
        print(f"lh-export: wrote {export(args.checkpoint, args.out, args.dtype, args.tokenizer)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"lh-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
