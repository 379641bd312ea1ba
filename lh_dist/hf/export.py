"""`lh-export`: turn a checkpoint into a Hugging Face folder that `transformers` uses as is.

    lh-export runs/tiny-cpu --out exported/tiny                           # the newest checkpoint of a run
    lh-export runs/tiny-cpu/checkpoints/step_00000060 --out exported/tiny --dtype bfloat16

The folder holds config.json and generation_config.json, model.safetensors, the tokenizer
(tokenizer.json + tokenizer_config.json), README.md (a model card: shape, phases, tokens, final
losses) and lh_dist_config.yaml (the training config). Every file is readable by all (0644), for
shared storage. Then:

    from transformers import pipeline
    pipeline("text-generation", model="exported/tiny")("def main():", max_new_tokens=40)

A run that started from an imported model (lh-import, lh-train --init-from) keeps its origin in
<run_dir>/hf/: the export is of the imported architecture, with its config.json (rope_theta,
rope_scaling and max_position_embeddings as the run has them), its tokenizer files byte for byte
and its generation config. Other runs export as LlamaForCausalLM (Qwen2 / Qwen3 for models with
q/k/v biases / q/k norms) with the end-of-document token as eos, bos and pad. Names and config
keys map through lh_dist.hf.mapping.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from lh_dist.checkpoint.format import (STEP_DIR, checkpoint_config, load_model_state, resolve_checkpoint,
                                       trainer_state)
from lh_dist.checkpoint.run_dir import INIT_RECORD
from lh_dist.config import TrainConfig, save_config
from lh_dist.hf.mapping import HF_DIR, hf_config, hf_name, read_origin

DTYPES = ("float32", "bfloat16", "float16")
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "README.md", "lh_dist_config.yaml")
EOD_TOKEN = "<|endoftext|>"  # the byte tokenizer's end-of-document id 256, by its usual name
# What the model's forward takes: without it, a tokenizer that also returns token_type_ids breaks
# `model.generate(**tokenizer(text, return_tensors="pt"))`.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


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
              "clean_up_tokenization_spaces": False, "model_max_length": 10**9,
              "model_input_names": MODEL_INPUT_NAMES}
    if bos:
        config["bos_token"] = eod_token
    return config


def _write_tokenizer(out: Path, spec: str, eod_id: int) -> list[str]:
    """The training tokenizer: the byte tokenizer, or a copy of the tokenizer.json it was read from.
    Returns the names written."""
    if spec == "byte":
        files = byte_tokenizer_files(eod_id)
        for name, content in files.items():
            (out / name).write_text(json.dumps(content, indent=1, ensure_ascii=False))
        return list(files)
    from lh_dist.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec)
    shutil.copyfile(tokenizer.path, out / "tokenizer.json")
    config = _tokenizer_config(tokenizer.eod_token, bos=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    return ["tokenizer.json", "tokenizer_config.json"]


def _write_imported_tokenizer(out: Path, hf: Path, eod_id: int) -> list[str]:
    """The imported model's files of <run_dir>/hf byte for byte (tokenizer, special tokens, generation
    config), but tokenizer_config.json, which gets MODEL_INPUT_NAMES. Returns the names written."""
    from lh_dist.data.tokenizer import load_tokenizer

    written = []
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        if (hf / name).is_file():
            shutil.copyfile(hf / name, out / name)
            written.append(name)
    if "generation_config.json" not in written:
        (out / "generation_config.json").write_text(json.dumps(generation_config(eod_id), indent=2))
        written.append("generation_config.json")
    if (hf / "tokenizer_config.json").is_file():
        config = json.loads((hf / "tokenizer_config.json").read_text())
        config["model_input_names"] = MODEL_INPUT_NAMES
    else:
        config = _tokenizer_config(load_tokenizer(str(hf / "tokenizer.json")).eod_token, bos=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return [*written, "tokenizer_config.json"]


def _init_record(run_dir: Path) -> dict | None:
    """The checkpoint a run's weights started from (--init-from), or None."""
    path = run_dir / INIT_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def model_card(cfg: TrainConfig, folder: Path, state: dict, n_params: int, tokenizer: str, config: dict,
               origin: dict | None = None, eod_token: str = EOD_TOKEN) -> str:
    """README.md of the export: what the model is and how it was trained, from the config, config.json and
    the checkpoint's trainer state (older checkpoints lack tokens and losses; those rows are left out).
    tokenizer: "byte", a tokenizer.json, or "imported" (the tokenizer of `origin`, an import's origin.json);
    eod_token: its end-of-document token, as text."""
    step = int(STEP_DIR.match(folder.name).group(1))
    lh, s = cfg.lighthouse, cfg.schedule
    lighthouse_steps = min(step, s.lighthouse_steps)
    run = folder.parent.parent.name
    rows = [("steps", f"{step:,} of {s.steps:,} planned" if step else "0: not trained with lh_dist")]
    imported = f"`{origin['source']}` ({origin['architecture']}, imported by lh-import)" if origin else None
    start = _init_record(folder.parent.parent)
    if start is not None and start["step"] > 0:  # --init-from a trained checkpoint
        rows.insert(0, ("initial weights", f"`{start['checkpoint']}` (step {start['step']:,} of another run"
                                           + (f", which started from {imported})" if imported else ")")))
    elif imported:
        rows.insert(0, ("initial weights", imported))
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
    data = (", ".join(f"`{source.path}` (weight {source.weight:g})" for source in cfg.data.sources)
            if cfg.data.sources else f"`{cfg.data.path}`")
    if step:
        rows += [("data", f"{data}, tokenizer "
                          + ("of the imported model" if tokenizer == "imported" else f"`{tokenizer}`")),
                 ("optimizer", f"AdamW, lr {cfg.optim.lr:g}, {s.decay} schedule after {s.warmup_steps} warmup steps"
                               + (f" over the last {s.decay_steps} steps" if s.decay_steps is not None else "")
                               + f", weight decay {cfg.optim.weight_decay:g}, clipping {cfg.optim.grad_clip:g}")]
    m = cfg.model
    ended_sparse = state.get("phase") == "lighthouse"
    if not step:
        how = ", not trained with lh_dist: the weights of its import."
    elif lighthouse_steps:
        how = (f" trained with lh_dist: Lighthouse attention (arXiv 2605.06554) for {lighthouse_steps:,} steps"
               + (", then dense attention." if step > lighthouse_steps else "."))
    else:
        how = " trained with lh_dist, dense attention throughout."
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        f"tags: [lh_dist, {config['model_type']}]", "---", "",
        f"# {run}, step {step:,}", "",
        f"A {n_params / 1e6:.2f}M-parameter {config['architectures'][0]} ({m.n_layers} layers, width {m.dim}, "
        f"{m.n_heads} heads, {m.n_kv_heads} KV heads, vocabulary {m.vocab_size})" + how
        + " `transformers` runs every layer dense."
        + (" This checkpoint was written during the Lighthouse phase, before any dense training." if ended_sparse
           else ""), "",
        "## Training", "", "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
        "The full training configuration: [lh_dist_config.yaml](lh_dist_config.yaml). "
        f"Exported from `{folder}`.", "",
        "## Use", "", "```python", "from transformers import pipeline", "",
        'generate = pipeline("text-generation", model="path/to/this/folder")',
        'print(generate("def main():", max_new_tokens=64)[0]["generated_text"])', "```", "",
        f"Documents are separated by `{eod_token}`, the eos token: generation stops there.",
    ]
    if tokenizer == "byte":
        lines[-1] += (f" Token ids 0-255 are the bytes of the UTF-8 text and id 256 is `{EOD_TOKEN}`; "
                      "decoding gives back the text exactly.")
    return "\n".join(lines) + "\n"


# Weight files of a model folder (Hugging Face, PyTorch, GGUF).
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.gguf")


def _check_out(out: Path) -> None:
    """ValueError, before any work, unless `out` is a folder or can be created as one."""
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing == out and not out.is_dir():
        raise ValueError(f"--out {out} is a file; lh-export writes a folder (created if missing)")
    if not existing.is_dir():
        raise ValueError(f"--out {out} cannot be created: {existing} is a file")
    # An earlier export (it holds lh_dist_config.yaml) is replaced; any other model's weights are not, so
    # that the folder an import came from, or another model, is never overwritten by mistake.
    weights = sorted(p.name for pattern in WEIGHT_FILES for p in out.glob(pattern)) if out.is_dir() else []
    if weights and not (out / "lh_dist_config.yaml").is_file():
        raise ValueError(f"--out {out} holds a model that lh-export did not write ({', '.join(weights[:3])}"
                         f"{', ...' if len(weights) > 3 else ''}): choose a new or empty folder")


def export(checkpoint: Path, out: Path, dtype: str = "float32", tokenizer: str | None = None) -> Path:
    """Write the Hugging Face folder `out` from a checkpoint folder or a run directory's newest checkpoint.

    tokenizer: "byte" or a tokenizer.json; default: the imported one (<run_dir>/hf) for a run that
    started from an imported model, else the one recorded in the training dataset.
    """
    from safetensors.torch import save_file

    from lh_dist.data.loader import read_dataset_info
    from lh_dist.data.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _check_out(Path(out))
    checkpoint = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint)
    hf = checkpoint.parent.parent / HF_DIR
    origin = read_origin(hf.parent)
    if origin is not None and tokenizer is not None:
        raise ValueError(f"--tokenizer does not apply: {hf.parent} started from an imported model, whose "
                         f"tokenizer is {hf / 'tokenizer.json'}")
    if origin is not None:
        tokenizer = str(hf / "tokenizer.json")
    elif tokenizer is None:
        try:
            tokenizer = read_dataset_info(cfg.data.primary_path).get("tokenizer", "byte")
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"cannot tell the training tokenizer ({e}); pass --tokenizer") from None
    loaded = load_tokenizer(tokenizer)
    eod_id, eod_token = loaded.eod_id, EOD_TOKEN if tokenizer == "byte" else loaded.eod_token
    # Documents are separated by one end-of-document token: it starts, ends and pads them.
    special_ids = {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": eod_id}
    config = hf_config(cfg.model, dtype=dtype, context=cfg.data.seq_len, special_ids=special_ids, origin=origin)
    state = load_model_state(checkpoint)
    if cfg.model.tie_embeddings:
        state.pop("output.weight", None)  # the embedding once more
    n_params = sum(v.numel() for v in state.values())
    tensors = {hf_name(k): v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if origin is not None:
        written = _write_imported_tokenizer(out, hf, eod_id)
    else:
        (out / "generation_config.json").write_text(json.dumps(generation_config(eod_id), indent=2))
        written = ["generation_config.json", *_write_tokenizer(out, tokenizer, eod_id)]
    save_config(cfg, out / "lh_dist_config.yaml")
    card = model_card(cfg, checkpoint, trainer_state(checkpoint), n_params,
                      "imported" if origin is not None else tokenizer, config, origin, eod_token)
    (out / "README.md").write_text(card)
    # safetensors writes its file for the owner only; an export is meant to be shared.
    out.chmod(0o755)
    for name in {*written, "config.json", "model.safetensors", "lh_dist_config.yaml", "README.md"}:
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
    parser.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: an imported model's own, else "
                                            "the tokenizer recorded in the training dataset's lh_data.json)")
    args = parser.parse_args(argv)
    try:
        skipped: list[str] = []
        folder = resolve_checkpoint(args.checkpoint, skipped)
        for line in skipped:
            print(f"lh-export: {line}", file=sys.stderr)
        print(f"lh-export: wrote {export(folder, args.out, args.dtype, args.tokenizer)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"lh-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
