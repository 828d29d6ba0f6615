"""The run folder: its files, checkpoints, and the report."""
