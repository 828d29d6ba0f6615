"""The tuning workbench: hyperparameter search over recipes and side-by-side comparison of runs.

``tuneflow.workbench.search.search`` and ``tuneflow.workbench.compare.compare`` back the
``tuneflow search`` and ``tuneflow compare`` commands; the modules are imported on use, so
comparing runs does not need Optuna.
"""
