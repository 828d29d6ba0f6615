"""Prometheus metrics of the service (prometheus_client, one registry per app) and the ASGI middleware that records them."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Request latency in seconds: from 1 ms (a cached health check) to 10 s (a full batch on a slow CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images per model call


class Metrics:
    def __init__(self, endpoints):
        self.registry = CollectorRegistry()
        self.endpoints = frozenset(endpoints)
        r = self.registry
        self.requests = Counter("tuneflow_requests", "HTTP requests answered", ["endpoint"], registry=r)
        self.errors = Counter("tuneflow_errors", "HTTP requests answered with an error status",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram("tuneflow_request_latency_seconds", "time from request to response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("tuneflow_batch_size", "images per model call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("tuneflow_images", "images run through the model", ["kind"], registry=r)
        self.in_flight = Gauge("tuneflow_requests_in_flight", "requests accepted and not yet answered",
                               registry=r)

    def endpoint(self, path: str) -> str:
        return path if path in self.endpoints else "other"  # unknown paths share one label


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status, and times it (pure ASGI: no body copies)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m = self.metrics
        endpoint = m.endpoint(scope["path"])
        status = {"code": 500}
        t0 = time.perf_counter()
        m.in_flight.inc()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            m.in_flight.dec()
            m.requests.labels(endpoint).inc()
            if status["code"] >= 400:
                m.errors.labels(endpoint, str(status["code"])).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)
