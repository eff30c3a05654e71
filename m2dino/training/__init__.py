"""Training: the config and CLI options, the one multi-task loss, the trainer of one model,
atomic checkpoints with exact resume, data-parallel helpers, and the TS / CG / AU study."""
