"""DP x CP process layout.

CP is the innermost dimension: ranks [d*cp, (d+1)*cp) form the CP group of
data-parallel replica d. Consecutive ranks then share a sample (they share a
dp_rank, and the packed loader's batches are a function of the dp_rank), and CP
traffic (the heaviest) stays within a node when cp_degree divides the GPUs per node.

Parameters are replicated over DP and CP alike, so their gradients are averaged
over the whole DP x CP world. Hand DeepSpeed no mpu: its default
data-parallel group (the world) is exactly that. Declaring CP as DeepSpeed's
model- or sequence-parallel dimension would be wrong: the former never
reduces gradients across CP, the latter sums them over CP instead of averaging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from lh_dist.config import ConfigError

if TYPE_CHECKING:
    from lh_dist.config import TrainConfig


def resolve_degrees(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(dp, cp) of `cfg.parallel` for this world size; ConfigError naming the field when they do not fit."""
    cp = cfg.parallel.cp_degree
    cfg.parallel.check_world_size(world_size)
    dp = cfg.parallel.dp_degree or world_size // cp
    if dp * cp != world_size:
        raise ConfigError(f"parallel.dp_degree must be 0 (auto) or world size / parallel.cp_degree = "
                          f"{world_size // cp}, got {dp}")
    return dp, cp


@dataclass(frozen=True)
class LayoutPlan:
    """Rank coordinates of a DP x CP layout, computed without any process group."""

    world_size: int
    dp_degree: int
    cp_degree: int
    coords: tuple[tuple[int, int], ...]  # coords[rank] = (dp_rank, cp_rank)
    cp_group_ranks: tuple[tuple[int, ...], ...]  # one tuple of global ranks per DP replica
    dp_group_ranks: tuple[tuple[int, ...], ...]  # one tuple of global ranks per CP position


def plan_layout(world_size: int, dp_degree: int, cp_degree: int) -> LayoutPlan:
    """Validate dp_degree x cp_degree == world_size and return every rank's (dp_rank, cp_rank)."""
    for name, value in (("world_size", world_size), ("dp_degree", dp_degree), ("cp_degree", cp_degree)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if dp_degree * cp_degree != world_size:
        raise ValueError(
            f"dp_degree * cp_degree must equal the world size: "
            f"{dp_degree} * {cp_degree} = {dp_degree * cp_degree} != world_size={world_size}"
        )
    coords = tuple((rank // cp_degree, rank % cp_degree) for rank in range(world_size))
    cp_group_ranks = tuple(tuple(range(d * cp_degree, (d + 1) * cp_degree)) for d in range(dp_degree))
    dp_group_ranks = tuple(tuple(range(c, world_size, cp_degree)) for c in range(cp_degree))
    return LayoutPlan(world_size, dp_degree, cp_degree, coords, cp_group_ranks, dp_group_ranks)


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the DP x CP layout and its process groups (None when world size is 1)."""

    world_size: int
    rank: int
    dp_degree: int
    cp_degree: int
    dp_rank: int
    cp_rank: int
    cp_group: dist.ProcessGroup | None  # the ranks sharing one sample


def init_parallel_layout(dp_degree: int, cp_degree: int) -> ParallelLayout:
    """Build the CP groups; needs torch.distributed initialized unless the world size is 1.

    No DP group is built: DeepSpeed averages gradients over the whole world (DP x CP), and
    nothing else reduces over DP alone.

    Collective: every rank must call it with the same arguments.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    plan = plan_layout(world_size, dp_degree, cp_degree)
    dp_rank, cp_rank = plan.coords[rank]
    if not initialized:
        return ParallelLayout(1, 0, 1, 1, 0, 0, None)

    # new_group is collective over the world: every rank creates every group, in the same order.
    cp_group = None
    for ranks in plan.cp_group_ranks:
        group = dist.new_group(list(ranks))
        if rank in ranks:
            cp_group = group
    return ParallelLayout(world_size=world_size, rank=rank, dp_degree=dp_degree, cp_degree=cp_degree,
                          dp_rank=dp_rank, cp_rank=cp_rank, cp_group=cp_group)
