"""From a recipe and data to a finished run: train, export, evaluate, report (``finetune``, k-fold)."""
