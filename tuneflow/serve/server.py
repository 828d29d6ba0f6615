"""``tuneflow serve``: load and warm the model (failing before the port opens), then run uvicorn until SIGTERM drains it (exit status 0).

uvicorn's own limits guard the connections: ``limit_concurrency`` (connections and requests at
once; beyond it an immediate 503), ``timeout_keep_alive`` (idle keep-alive connections), h11's
cap on the size of a request's headers; :class:`HeaderDeadline` adds what uvicorn lacks, a time
limit on a request's headers (a client that trickles them, slowloris-style, is disconnected), and
:class:`.app.BodyLimit` one on its body.
"""
from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path

import numpy as np
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import RunError, TuneflowError
from ..export.embed import load_predictor
from ..export.explain import Explainer
from ..export.restore import artifact_from_checkpoint
from ..index import load_index
from .auth import ENV_VAR, load_api_key
from .app import create_app
from .config import ServeConfig
from .memory import limit_arenas

log = logging.getLogger("tuneflow.serve")


def load_for_serving(run, checkpoint: str = "best", index_dir=None):
    """Load the predictor (and index), then run one image through every function the service
    calls, so a missing, damaged or mismatched model fails here and the first request is not slow."""
    try:
        predictor = load_predictor(run, checkpoint)
    except TuneflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged SavedModel raises TensorFlow's own errors
        raise RunError(f"cannot load the model of run {run} (checkpoint {checkpoint}): "
                       f"{type(exc).__name__}: {exc}. Re-export the run or choose another checkpoint.") from exc
    index = None
    if index_dir is not None:
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


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers: ``header_timeout_s``
    after the connection opens (or after the previous response), a connection whose next
    request's headers are not all in is closed. uvicorn's keep-alive timer stops at the first
    byte received, so one byte every few seconds would hold a connection forever without this."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        cycle = self.cycle  # a new request replaces it once its headers are complete
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._late, cycle)

    def _late(self, cycle) -> None:
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server, except that after SIGTERM or Ctrl-C has drained it the process exits 0
    (uvicorn re-raises the signal, which ends the process as killed by it: status -15)."""

    def capture_signals(self):
        cm = super().capture_signals()
        server = self

        class _NoReraise:
            def __enter__(self):
                return cm.__enter__()

            def __exit__(self, *exc):
                server._captured_signals.clear()  # drained already; exit normally
                return cm.__exit__(*exc)
        return _NoReraise()


def load_explainer(run, checkpoint: str = "best"):
    """The Grad-CAM explainer of the model the service serves: the run's ``model.keras`` (for
    ``best``), or the checkpoint's graphs built in memory."""

    run = Path(run)
    if checkpoint == "best":
        return Explainer.from_run(run if (run / "model.keras").is_file() else run.parent)
    models = artifact_from_checkpoint(run, checkpoint)
    return Explainer(models.classifier, models.info)


def serve(run, *, host: str = "127.0.0.1", port: int = 8080, checkpoint: str = "best",
          index_dir=None, cfg: ServeConfig | None = None, api_key_file=None) -> int:
    """Serve until SIGTERM or Ctrl-C; accepted requests are answered before it returns 0."""
    limit_arenas()  # before the model's and the request pool's threads exist: see .memory
    cfg = (cfg or ServeConfig()).checked()
    api_key = load_api_key(api_key_file)
    predictor, index = load_for_serving(run, checkpoint, index_dir)
    app = create_app(predictor, cfg, index, on_stop=_report_drained, api_key=api_key, run_dir=run,
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
    protocol = type("TuneflowH11", (HeaderDeadline,), {"header_timeout_s": cfg.header_timeout_s})
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=protocol,
                            timeout_graceful_shutdown=cfg.drain_timeout_s, timeout_keep_alive=cfg.keep_alive_s,
                            limit_concurrency=cfg.limit_concurrency)
    server = Server(config)
    info = predictor.info
    key = ("API key from --api-key-file" if api_key_file else f"API key from {ENV_VAR}") if api_key else "no API key"
    print(f"tuneflow: serving {run} ({info.get('backbone')}, {len(predictor.classes)} classes, "
          f"{predictor.embedding_dim}-d embeddings{', index of %d images' % len(index) if index else ''}; "
          f"{key}; memory budget {cfg.max_inflight_pixels} decoded pixels in flight) "
          f"on http://{host}:{bound}", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM/SIGINT (stops accepting, answers what it accepted, then ends the
    # lifespan, which stops the worker after its queue); Server then returns instead of re-raising
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
                      max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels,
                      max_inflight_pixels=args.max_inflight_pixels, max_queue=args.max_queue,
                      limit_concurrency=args.limit_concurrency, header_timeout_s=args.header_timeout,
                      body_timeout_s=args.body_timeout, docs=args.docs)
    return serve(args.run, host=args.host, port=args.port, checkpoint=args.checkpoint,
                 index_dir=args.index, cfg=cfg, api_key_file=args.api_key_file)
