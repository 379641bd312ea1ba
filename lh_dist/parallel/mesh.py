"""DP x CP process layout.

CP is the innermost dimension: ranks [d*cp, (d+1)*cp) form the CP group of
data-parallel replica d. Consecutive ranks then share a sample, which is what
mosaicml-streaming's `replication=cp_degree` delivers, and CP traffic (the
heaviest) stays within a node when cp_degree divides the GPUs per node.

Parameters are replicated over DP and CP alike, so their gradients are averaged
over the whole DP x CP world (`grad_group`). Hand DeepSpeed no mpu: its default
data-parallel group (the world) is exactly that. Declaring CP as DeepSpeed's
model- or sequence-parallel dimension would be wrong: the former never
reduces gradients across CP, the latter sums them over CP instead of averaging.
"""

from dataclasses import dataclass

import torch.distributed as dist


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
    dp_group: dist.ProcessGroup | None  # same CP position across replicas
    cp_group: dist.ProcessGroup | None  # the ranks sharing one sample
    grad_group: dist.ProcessGroup | None  # DP x CP: where parameter gradients are averaged


def init_parallel_layout(dp_degree: int, cp_degree: int) -> ParallelLayout:
    """Build the DP x CP groups; needs torch.distributed initialized unless the world size is 1.

    Collective: every rank must call it with the same arguments.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    plan = plan_layout(world_size, dp_degree, cp_degree)
    dp_rank, cp_rank = plan.coords[rank]
    if not initialized:
        return ParallelLayout(1, 0, 1, 1, 0, 0, None, None, None)

    # new_group is collective over the world: every rank creates every group, in the same order.
    cp_group = dp_group = None
    for ranks in plan.cp_group_ranks:
        group = dist.new_group(list(ranks))
        if rank in ranks:
            cp_group = group
    for ranks in plan.dp_group_ranks:
        group = dist.new_group(list(ranks))
        if rank in ranks:
            dp_group = group
    return ParallelLayout(
        world_size=world_size, rank=rank, dp_degree=dp_degree, cp_degree=cp_degree,
        dp_rank=dp_rank, cp_rank=cp_rank, dp_group=dp_group, cp_group=cp_group,
        grad_group=dist.group.WORLD,
    )
