"""Context parallelism: DP x CP layout (`mesh`), zigzag sharding (`sharding`), ring transfers and the
CP exchanges (`comm`), ring attention (`ring_attention`), Lighthouse under CP (`lighthouse_cp`).

Import from the modules: this file imports none of them, so that the config, which takes the names
of the CP exchanges from `comm`, loads no attention kernel.
"""
