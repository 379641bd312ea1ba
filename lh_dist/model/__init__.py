from lh_dist.model.llama import AttentionFn, Transformer, apply_rope, rope_tables

__all__ = ["AttentionFn", "Transformer", "apply_rope", "rope_tables"]
