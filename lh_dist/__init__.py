"""lh_dist: long-context training with Lighthouse attention and context parallelism."""

__version__ = "0.1.0"
