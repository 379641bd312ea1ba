"""Data: tokenizers, document sources, MDS shard writing (`lh-data`) and the packed loader."""

from lh_dist.data.loader import PackedLoader, read_dataset_info
from lh_dist.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "PackedLoader", "load_tokenizer", "read_dataset_info"]
