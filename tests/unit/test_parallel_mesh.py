"""DP x CP layout: the pure plan, and the process groups on 4 ranks (threads of this process)."""

import pytest
import torch
import torch.distributed as dist

from lh_dist.config import ConfigError, load_config
from lh_dist.parallel.mesh import init_parallel_layout, plan_layout, resolve_degrees

from spawn import thread_ranks


def test_plan_puts_cp_innermost():
    plan = plan_layout(8, dp_degree=2, cp_degree=4)
    assert plan.coords == ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3))
    assert plan.cp_group_ranks == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert plan.dp_group_ranks == ((0, 4), (1, 5), (2, 6), (3, 7))


@pytest.mark.parametrize("world,dp,cp", [(8, 3, 2), (4, 1, 3), (4, 0, 4), (4, 2, -2)])
def test_plan_rejects_bad_degrees(world, dp, cp):
    with pytest.raises(ValueError, match="dp_degree|cp_degree"):
        plan_layout(world, dp, cp)


def test_single_process_layout_needs_no_process_group():
    layout = init_parallel_layout(1, 1)
    assert (layout.world_size, layout.dp_rank, layout.cp_rank, layout.cp_group) == (1, 0, 0, None)
    with pytest.raises(ValueError, match="world_size=1"):
        init_parallel_layout(1, 2)


def _check_groups(rank, world_size):
    layout = init_parallel_layout(dp_degree=2, cp_degree=2)
    assert (layout.dp_rank, layout.cp_rank) == (rank // 2, rank % 2)
    assert dist.get_world_size(layout.cp_group) == 2 and dist.get_rank(layout.cp_group) == layout.cp_rank
    # Summing global ranks over the group identifies its members: {0, 1} and {2, 3}.
    total = torch.tensor([rank])
    dist.all_reduce(total, group=layout.cp_group)
    assert total.item() == {0: 1, 1: 1, 2: 5, 3: 5}[rank]
    with pytest.raises(ValueError, match="world_size=4"):
        init_parallel_layout(dp_degree=1, cp_degree=2)


def test_groups_on_four_ranks():
    thread_ranks(_check_groups, 4)


def _cfg(dp: int, cp: int):
    return load_config(None, [f"parallel.dp_degree={dp}", f"parallel.cp_degree={cp}"])


def test_degrees_for_a_world_size():
    assert resolve_degrees(_cfg(0, 2), 8) == (4, 2)  # dp 0: whatever the world leaves
    assert resolve_degrees(_cfg(2, 4), 8) == (2, 4)
    with pytest.raises(ConfigError, match=r"^parallel.cp_degree=4 must divide the world size 6$"):
        resolve_degrees(_cfg(0, 4), 6)
    with pytest.raises(ConfigError, match=r"^parallel.dp_degree must be 0 \(auto\) or world size / "
                                          r"parallel.cp_degree = 4, got 3$"):
        resolve_degrees(_cfg(3, 2), 8)
