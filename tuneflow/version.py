"""The package version, in one place (setup.cfg reads it from here; `tuneflow.__version__` is the same)."""
__version__ = "0.2.0"
