"""Training: a plan from recipe and data, model assembly, the stage runner, evaluation, k-fold."""
