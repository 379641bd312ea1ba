"""`lh-import`: a Hugging Face model folder becomes an lh_dist run directory at step 0.

    lh-import models/Qwen3-0.6B --out runs/qwen3-import
    lh-data jsonl --tokenizer runs/qwen3-import/hf --out runs/data/web web.jsonl
    lh-train --config runs/qwen3-import/config.yaml --init-from runs/qwen3-import \\
        logging.run_dir=runs/qwen3-long data.path=runs/data/web data.seq_len=32768

The folder holds config.json, the weights (model.safetensors, shards with model.safetensors.index.json,
or pytorch_model*.bin) and the tokenizer (tokenizer.json, tokenizer_config.json). Accepted: Llama,
Mistral, Qwen2 and Qwen3 causal LMs that lh_dist's model computes exactly; anything else is refused
with one line naming the config key (lh_dist/hf/mapping.py).

The run directory gets:
  config.yaml                 a full lh_dist config: the model's shape, defaults for continued pre-training;
                              data.path and data.seq_len are placeholders to override
  checkpoints/step_00000000/  the weights in fp32 (no optimizer state), read by lh-train --init-from,
                              lh-eval and lh-export like any checkpoint
  hf/                         the tokenizer files, generation_config.json and origin.json (the imported
                              config.json and the tokenizer's identity), for training checks and export
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from lh_dist.checkpoint.checkpointer import Checkpointer
from lh_dist.checkpoint.format import flat_config
from lh_dist.config import TrainConfig, load_config, save_config
from lh_dist.data.tokenizer import load_tokenizer
from lh_dist.hf.mapping import (ARCHITECTURES, HF_DIR, HF_FILES, IGNORED_TENSOR_SUFFIXES, ORIGIN, UnsupportedModel,
                                architecture, hf_name, max_position_embeddings, model_section, our_name,
                                parameter_shapes)

# data.seq_len when the model's context is longer: a length that fits one GPU, to be overridden.
DEFAULT_SEQ_LEN = 4096
# Continued pre-training of a trained model: a small learning rate with a short warmup.
CONTINUED_PRETRAINING = {"optim.lr": 2e-5, "optim.weight_decay": 0.1, "schedule.steps": 1000,
                         "schedule.warmup_steps": 50, "schedule.decay": "cosine", "schedule.lighthouse_steps": 0}


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object; ValueError naming the file if it is not one."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: those an index names, else every *.safetensors, else
    every pytorch_model*.bin. FileNotFoundError if there are none."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = read_json_object(folder / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{folder / index} has no weight_map object")
            return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no weights (model.safetensors, shards with "
                                f"model.safetensors.index.json, or pytorch_model*.bin)")
    return files


def _tensors(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) of every tensor, one at a time."""
    from safetensors import safe_open

    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"weight file {file} not found (named by the index)")
        # safetensors and torch.load raise their own error types (SafetensorError, UnpicklingError,
        # RuntimeError, ...) for a truncated or corrupt file; each becomes one line naming the file.
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield file, name, f.get_tensor(name)
            else:
                tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                yield from ((file, k, v) for k, v in tensors.items())
        except Exception as e:
            raise ValueError(f"weight file {file} cannot be read ({type(e).__name__}: {e})") from None


def read_weights(folder: Path, section: dict) -> dict[str, torch.Tensor]:
    """Our fp32 state dict from a folder's weights; UnsupportedModel naming the tensor for one that is
    missing, extra, of the wrong shape or not exactly representable in fp32 (bf16 and fp16 always are)."""
    shapes = parameter_shapes(section)
    state: dict[str, torch.Tensor] = {}
    for file, name, tensor in _tensors(weight_files(folder)):
        if name.endswith(IGNORED_TENSOR_SUFFIXES):
            continue
        ours = our_name(name)
        if ours not in shapes:
            raise UnsupportedModel(f"{file.name}: tensor {name} has no place in lh_dist's model of this config")
        if tuple(tensor.shape) != shapes[ours]:
            raise UnsupportedModel(f"{file.name}: tensor {name} has shape {tuple(tensor.shape)}, the config "
                                   f"says {shapes[ours]}")
        if not tensor.is_floating_point():
            raise UnsupportedModel(f"{file.name}: tensor {name} is {tensor.dtype}; quantized weights are not "
                                   f"imported")
        weight = tensor.to(torch.float32)
        if tensor.dtype == torch.float64 and not torch.equal(weight.double(), tensor):
            raise UnsupportedModel(f"{file.name}: tensor {name} is float64 with values float32 cannot hold "
                                   f"(lh_dist keeps weights in float32)")
        state[ours] = weight
    if section["tie_embeddings"]:
        head = state.pop("output.weight", None)
        if head is not None and "embed.weight" in state and not torch.equal(head, state["embed.weight"]):
            raise UnsupportedModel("tensor lm_head.weight differs from model.embed_tokens.weight, but config.json "
                                   "says tie_word_embeddings=true")
        if "embed.weight" in state:
            state["output.weight"] = state["embed.weight"]  # one tensor, as in the tied model
    missing = [name for name in shapes if name not in state]
    if missing:
        raise UnsupportedModel(f"tensor {hf_name(missing[0])} is missing from the weights in {folder}"
                               + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
    return {name: state[name] for name in shapes}


def run_config(section: dict, context: int, out: Path) -> TrainConfig:
    """The imported run's config: the model section, defaults for continued pre-training, and placeholders
    for the data (data.seq_len: the model's context, at most DEFAULT_SEQ_LEN)."""
    seq_len = min(context, DEFAULT_SEQ_LEN)
    settings = flat_config({"model": section}) | CONTINUED_PRETRAINING | {
        "data.seq_len": seq_len - seq_len % 2, "data.path": f"runs/data/{out.name}", "logging.run_dir": str(out)}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in settings.items()])


class _WeightsOnly:
    """What `Checkpointer.save` asks of an engine: DeepSpeed's model-states file, without optimizer state."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def save(self, folder: Path) -> None:
        torch.save({"module": self.state}, folder / "mp_rank_00_model_states.pt")


def import_model(source: str | Path, out: str | Path) -> Path:
    """Write the run directory `out` (must be empty or absent) from the Hugging Face folder `source`;
    returns its step-0 checkpoint folder. Nothing is left in `out` on an error."""
    source, out = Path(source), Path(out)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: give a Hugging Face model folder")
    config = read_json_object(config_path)
    section = model_section(config)
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source} has no tokenizer.json (lh_dist reads Hugging Face tokenizers from "
                                f"tokenizer.json)")
    tokenizer = load_tokenizer(str(source / "tokenizer.json"))
    if tokenizer.vocab_size > section["vocab_size"]:
        raise UnsupportedModel(f"tokenizer.json has {tokenizer.vocab_size} tokens, more than the model's "
                               f"vocab_size={section['vocab_size']}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder")
    context = max_position_embeddings(config)
    cfg = run_config(section, context, out)
    state = read_weights(source, section)

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        hf = out / HF_DIR
        hf.mkdir()
        copied = [name for name in HF_FILES if (source / name).is_file()]
        for name in copied:
            shutil.copyfile(source / name, hf / name)
        origin = {"architecture": architecture(config), "model_type": config["model_type"],
                  "source": str(source.resolve()), "config": config, "tokenizer": tokenizer.identity(),
                  "files": copied}
        (hf / ORIGIN).write_text(json.dumps(origin, indent=1) + "\n")
        save_config(cfg, out / "config.yaml")
        header = (f"# Written by lh-import from {source.resolve()} ({origin['architecture']}).\n"
                  f"# data.path and data.seq_len are placeholders: tokenize data with lh-data --tokenizer "
                  f"{hf} and set both.\n")
        (out / "config.yaml").write_text(header + (out / "config.yaml").read_text())
        checkpointer = Checkpointer(cfg, rank=0)
        checkpointer.last_bytes = 4 * sum(t.numel() for t in {id(t): t for t in state.values()}.values())
        trainer_state = {"step": 0, "phase": "dense", "weights_only": True, "nonfinite_total": 0, "tokens_seen": 0,
                         "train_loss": None, "val_loss": None, "imported_from": origin["source"],
                         "data": {"split": "train", "seed": cfg.seed, "seq_len": cfg.data.seq_len,
                                  "num_documents": 0, "samples_seen": 0}}
        return checkpointer.save(_WeightsOnly(state), 0, trainer_state)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def main(argv: list[str] | None = None) -> int:
    """`lh-import`; 0 on success, 2 (one line on stderr, nothing written) for a model it cannot import."""
    parser = argparse.ArgumentParser(prog="lh-import", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help=f"Hugging Face model folder ({', '.join(ARCHITECTURES)})")
    parser.add_argument("--out", type=Path, required=True, help="run directory to write (absent or empty)")
    args = parser.parse_args(argv)
    try:
        folder = import_model(args.path, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"lh-import: error: {e}", file=sys.stderr)
        return 2
    cfg = load_config(args.out / "config.yaml")
    print(f"lh-import: wrote {folder} ({cfg.model.n_layers} layers, width {cfg.model.dim}, vocabulary "
          f"{cfg.model.vocab_size}) and {args.out / 'config.yaml'}; data.path and data.seq_len there are "
          f"placeholders (tokenize with lh-data --tokenizer {args.out / HF_DIR})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
