"""Evaluation of trained checkpoints: pass-key retrieval and validation loss by position (`lh-eval`)."""
