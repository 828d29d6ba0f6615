"""HTTP service for a run's model (FastAPI + uvicorn): micro-batched embed, classify and search, with health, info and metrics."""
from .app import create_app
from .config import ApiError, ServeConfig
from .server import load_for_serving, serve

__all__ = ["ApiError", "ServeConfig", "create_app", "load_for_serving", "serve"]
