"""The harness that runs the distributed tests: what it reports when a rank fails."""

import pytest
from torch.multiprocessing.spawn import ProcessRaisedException

from spawn import spawn_ranks


def _second_rank_fails(rank, world_size):
    if rank == 1:
        raise AssertionError("rank 1's shard differs")


def test_the_failing_ranks_own_error_is_reported():
    # Rank 0 waits in the harness's closing barrier and sees its peer's connection close; the
    # error spawn raises must be rank 1's assertion, not that echo.
    with pytest.raises(ProcessRaisedException, match="rank 1's shard differs"):
        spawn_ranks(_second_rank_fails, 2, timeout_s=30)
