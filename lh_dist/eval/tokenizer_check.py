"""Which tokenizer a checkpoint's model reads, and the check that evaluation data and prompts use it.

An imported model's run keeps its tokenizer in `<run_dir>/hf/` (origin.json records its identity);
a model trained from scratch reads its training data's tokenizer (that data's lh_data.json). Token
ids of another tokenizer mean nothing to the model: a loss over them is a number, not a measurement,
and ids beyond the embedding fail deep in the forward pass. So evaluation compares identities first.
"""

from __future__ import annotations

from pathlib import Path

from lh_dist.data.loader import read_dataset_info
from lh_dist.data.tokenizer import identity_differences, recorded_identity
from lh_dist.hf.mapping import HF_DIR, read_origin


def model_tokenizer(folder: Path, cfg) -> tuple[str | None, dict | None]:
    """(spec for load_tokenizer, identity) of the tokenizer the model of checkpoint `folder` reads;
    (None, None) when its run holds no tokenizer and its training data is gone."""
    run_dir = Path(folder).parent.parent
    origin = read_origin(run_dir)
    if origin is not None and (run_dir / HF_DIR / "tokenizer.json").is_file():
        return str(run_dir / HF_DIR), origin["tokenizer"]
    try:
        info = read_dataset_info(cfg.data.primary_path)
    except (FileNotFoundError, ValueError):
        return None, None
    return info.get("tokenizer", "byte"), recorded_identity(info)


def check_tokenizer(what: str, identity: dict, model: dict | None, vocab_size: int) -> None:
    """ValueError (one line naming `what`) if a tokenizer's `identity` is not the model's: a vocabulary
    larger than the model's embedding (`vocab_size` rows), or, where the model's identity is known,
    another tokenizer.json hash or vocabulary size (`identity_differences`)."""
    if identity["vocab_size"] > vocab_size:
        raise ValueError(f"{what} has a vocabulary of {identity['vocab_size']:,} tokens, more than the model's "
                         f"embedding of {vocab_size:,} rows: it was tokenized for another model")
    if model is None:
        return
    differ = identity_differences(identity, model)
    if differ:
        raise ValueError(f"{what} uses another tokenizer than the model ({', '.join(differ)}): token ids of "
                         f"another tokenizer mean nothing to it")
