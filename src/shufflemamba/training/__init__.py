"""Training: configuration, data, the epoch engine, the Trainer, run-state checkpoints, DDP."""
