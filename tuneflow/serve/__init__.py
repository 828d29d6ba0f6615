"""HTTP service for a run's model (FastAPI + uvicorn): micro-batched embed, classify and search, with health, info and metrics, behind an optional API key and a memory budget."""
from .app import create_app
from .auth import require_api_key
from .config import ApiError, ServeConfig
from .server import load_for_serving, serve

__all__ = ["ApiError", "ServeConfig", "create_app", "load_for_serving", "require_api_key", "serve"]
