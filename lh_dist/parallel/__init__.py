"""Context parallelism: DP x CP layout, zigzag sharding, ring attention, Lighthouse under CP."""

from .lighthouse_cp import lighthouse_cp_attention
from .mesh import LayoutPlan, ParallelLayout, init_parallel_layout, plan_layout
from .ring_attention import ring_attention
from .sharding import zigzag_positions, zigzag_shard, zigzag_unshard

__all__ = [
    "LayoutPlan", "ParallelLayout", "init_parallel_layout", "lighthouse_cp_attention", "plan_layout",
    "ring_attention", "zigzag_positions", "zigzag_shard", "zigzag_unshard",
]
