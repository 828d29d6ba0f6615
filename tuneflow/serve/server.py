"""``tuneflow serve``: load and warm the model (failing before the port opens), then run uvicorn until SIGTERM drains it."""
from __future__ import annotations

import json
import logging
import socket
import sys
import time

import numpy as np

from ..errors import RunError, TuneflowError
from .config import ServeConfig

log = logging.getLogger("tuneflow.serve")


def load_for_serving(run, checkpoint: str = "best", index_dir=None):
    """Load the predictor (and index), then run one image through every function the service
    calls, so a missing, damaged or mismatched model fails here and the first request is not slow."""
    from ..export.embed import load_predictor
    try:
        predictor = load_predictor(run, checkpoint)
    except TuneflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged SavedModel raises TensorFlow's own errors
        raise RunError(f"cannot load the model of run {run} (checkpoint {checkpoint}): "
                       f"{type(exc).__name__}: {exc}. Re-export the run or choose another checkpoint.") from exc
    index = None
    if index_dir is not None:
        from ..index import load_index
        index = load_index(index_dir)
    t0 = time.perf_counter()
    try:
        probe = predictor.prepare([np.full((32, 32, 3), 128, np.uint8)])
        predictor.classify_prepared(probe)
        for layer in ("pooled", "penultimate"):
            for normalize in (True, False):
                emb = predictor.embed_prepared(probe, layer=layer, normalize=normalize)
                if index is not None and layer == index.meta["layer"] and emb.shape[1] != index.dim:
                    raise RunError(f"the index in {index_dir} holds {index.dim}-d vectors but run {run} "
                                   f"embeds {emb.shape[1]}-d ones ({layer}); build the index from this run.")
    except TuneflowError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RunError(f"the model of run {run} loads but fails on a test image: {type(exc).__name__}: "
                       f"{exc}. Re-export the run.") from exc
    log.info("model warmed up in %.1f s", time.perf_counter() - t0)
    return predictor, index


def load_explainer(run, checkpoint: str = "best"):
    """The Grad-CAM explainer of the model the service serves: the run's ``model.keras`` (for
    ``best``), or the checkpoint's graphs built in memory."""
    from pathlib import Path

    from ..export.explain import Explainer
    run = Path(run)
    if checkpoint == "best":
        return Explainer.from_run(run if (run / "model.keras").is_file() else run.parent)
    from ..export.restore import artifact_from_checkpoint
    models = artifact_from_checkpoint(run, checkpoint)
    return Explainer(models.classifier, models.info)


def serve(run, *, host: str = "127.0.0.1", port: int = 8080, checkpoint: str = "best",
          index_dir=None, cfg: ServeConfig | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C; accepted requests are answered before it returns."""
    import uvicorn

    from .app import create_app
    from .memory import limit_arenas
    limit_arenas()  # before the model's and the request pool's threads exist: see .memory
    cfg = cfg or ServeConfig()
    predictor, index = load_for_serving(run, checkpoint, index_dir)
    app = create_app(predictor, cfg, index, on_stop=_report_drained, run_dir=run,
                     explainer=lambda: load_explainer(run, checkpoint))
    # The socket is bound here, after the model is ready, so a port that answers has a model;
    # port 0 picks a free one, printed below for scripts and tests.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RunError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port.") from exc
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=cfg.drain_timeout_s, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    info = predictor.info
    print(f"tuneflow: serving {run} ({info.get('backbone')}, {len(predictor.classes)} classes, "
          f"{predictor.embedding_dim}-d embeddings{', index of %d images' % len(index) if index else ''}) "
          f"on http://{host}:{bound}", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM/SIGINT (stops accepting, answers what it accepted, then ends the
    # lifespan, which stops the worker after its queue), then re-raises the signal to exit
    server.run(sockets=[sock])
    return 0


def _report_drained(app) -> None:
    """One line on stderr after the drain: requests answered per endpoint, and none left in flight."""
    reg = app.state.metrics.registry
    answered = {e: int(reg.get_sample_value("tuneflow_requests_total", {"endpoint": e}) or 0)
                for e in sorted(app.state.metrics.endpoints)}
    in_flight = int(reg.get_sample_value("tuneflow_requests_in_flight") or 0)
    print("tuneflow: drained; " + json.dumps({"answered": answered, "in_flight": in_flight}),
          file=sys.stderr, flush=True)


def cli_serve(args) -> int:
    """``tuneflow serve RUN [--host] [--port] [--max-batch] [--max-wait-ms] [--index] ...``."""
    cfg = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, pad_batches=args.pad_batches,
                      max_request_bytes=args.max_request_bytes, max_images=args.max_images,
                      max_pixels=args.max_pixels)
    return serve(args.run, host=args.host, port=args.port, checkpoint=args.checkpoint,
                 index_dir=args.index, cfg=cfg)
