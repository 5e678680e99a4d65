"""Small helpers shared by the gRPC front ends: status translation and request metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import grpc
import grpc.aio

from fedgate.errors import FedgateError
from fedgate.metrics import GatewayMetrics

__all__ = ["Outcome", "RpcObserver", "abort_with", "status_of"]


def status_of(exc: FedgateError) -> grpc.StatusCode:
    """The gRPC status a FedgateError maps to (its ``grpc_status`` class attribute)."""
    return grpc.StatusCode[exc.grpc_status]


async def abort_with(context: grpc.aio.ServicerContext[object, object], exc: FedgateError) -> NoReturn:
    """Fail the RPC with the error's status and a message a person can act on."""
    await context.abort(status_of(exc), str(exc))
    raise AssertionError("unreachable: context.abort raises")


@dataclass(slots=True)
class Outcome:
    """Set ``code`` to the gRPC status name when a request fails."""

    code: str = "OK"


class RpcObserver:
    """Counts requests by method and status and times them."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    @contextmanager
    def observe(self, method: str, *, timed: bool = True) -> Iterator[Outcome]:
        outcome = Outcome()
        started = time.perf_counter()
        try:
            yield outcome
        except BaseException as exc:
            if outcome.code == "OK":
                outcome.code = "CANCELLED" if isinstance(exc, BaseException) and not isinstance(exc, Exception) \
                    else "INTERNAL"
            raise
        finally:
            self._metrics.requests.labels(method, outcome.code).inc()
            if timed:
                self._metrics.request_seconds.labels(method).observe(time.perf_counter() - started)
