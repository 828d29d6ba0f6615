"""The service's API key: where it comes from (``TUNEFLOW_API_KEY`` or ``--api-key-file``) and the FastAPI dependency that checks it.

When a key is set, every route that depends on :func:`require_api_key` answers 401 unless the
request carries ``Authorization: Bearer KEY``; the comparison takes the same time whatever the
guess (:func:`hmac.compare_digest`). A router added later protects its routes the same way:
``APIRouter(dependencies=[Depends(require_api_key)])``.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import Request

from ..errors import ServeError
from .config import ApiError

ENV_VAR = "TUNEFLOW_API_KEY"


def load_api_key(key_file: str | Path | None = None) -> str | None:
    """The key from ``key_file`` (its first line, stripped) or else from ``TUNEFLOW_API_KEY``; None
    when neither is set (the service is then open to whoever reaches its port)."""
    if key_file is not None:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip().splitlines()[:1]
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeError(f"--api-key-file {key_file}: cannot read it ({exc}); give a file holding the key.") from None
        if not key or not key[0].strip():
            raise ServeError(f"--api-key-file {key_file} is empty; write the key on its first line.")
        return key[0].strip()
    key = os.environ.get(ENV_VAR, "").strip()
    return key or None


def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 ``unauthorized`` unless the request carries the app's key
    (``request.app.state.api_key``; no key set: every request passes)."""
    key = getattr(request.app.state, "api_key", None)
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(401, "unauthorized", "this server needs an API key: send the header "
                       "'Authorization: Bearer KEY'" + (" (the key sent is not the right one)." if given else "."),
                       headers={"WWW-Authenticate": "Bearer"})
