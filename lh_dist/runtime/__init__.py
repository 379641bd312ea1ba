"""What training and evaluation share: each rank's device, starting torch.distributed, building a
run's model from its config, and reading checkpoints."""
