"""Training: DeepSpeed engine, the loop, checkpoints, metrics, export."""
