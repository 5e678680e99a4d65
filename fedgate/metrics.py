"""Prometheus metrics of the gateway: one registry per gateway, passed to every component.

No module-level metric objects: tests can run several gateways in one process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

__all__ = ["GatewayMetrics", "MetricsServer", "new_registry"]

K_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # s


def new_registry() -> CollectorRegistry:
    """A registry with the process and platform collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


@dataclass(frozen=True, slots=True)
class GatewayMetrics:
    """Metrics of the FATE-facing front, dispatch and store."""

    requests: Counter
    request_seconds: Histogram
    messages: Counter
    message_bytes: Counter
    forward_seconds: Histogram
    queued_messages: Gauge
    queued_bytes: Gauge
    outbox_messages: Gauge
    parked_pops: Gauge
    info: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
        return cls(
            requests=Counter("fedgate_requests", "gRPC requests served, by method and gRPC status code",
                             ["method", "code"], registry=registry),
            request_seconds=Histogram("fedgate_request_seconds", "Time to serve a gRPC request (pops excluded)",
                                      ["method"], buckets=K_LATENCY_BUCKETS, registry=registry),
            messages=Counter("fedgate_messages", "Messages handled, by direction, route kind and peer",
                             ["direction", "route", "peer"], registry=registry),
            message_bytes=Counter("fedgate_message_bytes", "Payload bytes handled, by direction, route kind and peer",
                                  ["direction", "route", "peer"], registry=registry),
            forward_seconds=Histogram("fedgate_forward_seconds", "Time to forward a message to a peer endpoint",
                                      ["peer", "endpoint"], buckets=K_LATENCY_BUCKETS, registry=registry),
            queued_messages=Gauge("fedgate_queued_messages", "Messages waiting in local queues", registry=registry),
            queued_bytes=Gauge("fedgate_store_bytes", "Payload bytes held in the store (queues and outbox)",
                               registry=registry),
            outbox_messages=Gauge("fedgate_outbox_messages", "Messages waiting in the outbox for peers",
                                  registry=registry),
            parked_pops=Gauge("fedgate_parked_pops", "Pop requests waiting for a message", registry=registry),
            info=Gauge("fedgate_info", "Gateway identity", ["name", "version", "parties"], registry=registry),
        )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class MetricsServer:
    """The /metrics HTTP endpoint on a daemon thread (prometheus_client's WSGI app)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer = make_server(host, port, make_wsgi_app(registry), handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fedgate-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
