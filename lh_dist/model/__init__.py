"""The decoder. It takes each layer's attention as a function and knows nothing of parallelism."""

from lh_dist.model.llama import AttentionFn, Transformer
from lh_dist.model.rope import apply_rope, inverse_frequencies, rope_tables

__all__ = ["AttentionFn", "Transformer", "apply_rope", "inverse_frequencies", "rope_tables"]
