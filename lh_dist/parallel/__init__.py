"""Context parallelism: DP x CP layout, zigzag sharding, ring attention, Lighthouse under CP."""
