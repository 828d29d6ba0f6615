"""The package version (one place: setup.cfg reads it as tuneflow.__version__)."""
__version__ = "0.2.0"
