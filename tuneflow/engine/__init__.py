"""The fine-tuning engine: stages, heads, optimizers, caches, checkpoints, reports."""
