"""A run's model assembled from its config: each layer's attention (Lighthouse or dense, on one
device or over a CP group), phases, activation checkpointing and offloading, compile (`model`); the
offloading itself (`offload`). The one place where the model meets parallelism; training,
evaluation and the benchmarks build their models here."""
