"""Where a message goes once a front end has turned it into an Envelope.

Rules of this module:

1. A message for one of this gateway's parties is stored in the local queue; the call returns once
   it is durable.
2. A message for another party follows its route: ``grpc`` endpoints get a synchronous OSX
   ``invoke`` hop (the call returns when the peer has stored it; on failure the next endpoint is
   tried); link transports (``tcp``, ``quic``, ``rdma``, ``auto``) put it in the durable outbox and
   return at once, the link delivers it in the background.
3. The audit chain runs before anything is stored or forwarded; a rejection raises RejectedError.
4. Every failure raises a FedgateError whose message a person can act on: which party and role,
   which table, which endpoint and why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from fedgate.errors import FedgateError, PeerUnavailableError
from fedgate.metrics import GatewayMetrics
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.osx_client import OsxForwarder
from fedgate.proxy.routing import Endpoint, Router
from fedgate.proxy.store import SqliteStore

__all__ = ["K_LINK_TRANSPORTS", "Direction", "Dispatcher", "Inspector"]

log = logging.getLogger("fedgate.dispatch")

Direction = Literal["outbound", "inbound"]
Inspector = Callable[[Envelope, Direction], Awaitable[None]]
"""Runs the audit chain; raises RejectedError to stop the message."""

K_LINK_TRANSPORTS = frozenset({"tcp", "quic", "rdma", "auto"})  # route transports served by the fedgate link


class _LinkWaker(Protocol):
    def __call__(self, peer: str) -> None: ...


class Dispatcher:
    """Stores, forwards or enqueues Envelopes according to the route table."""

    def __init__(
        self,
        *,
        party_ids: tuple[str, ...],
        store: SqliteStore,
        router: Router,
        forwarder: OsxForwarder,
        metrics: GatewayMetrics,
        inspect: Inspector | None = None,
        on_outbox: _LinkWaker | None = None,
    ) -> None:
        self._party_ids = frozenset(party_ids)
        self._store = store
        self._router = router
        self._forwarder = forwarder
        self._metrics = metrics
        self._inspect = inspect
        self._on_outbox = on_outbox

    def is_local(self, party: str) -> bool:
        return party in self._party_ids or self._router.is_local(party)

    async def inspect(self, envelope: Envelope, *, direction: Direction = "outbound") -> None:
        """Run the audit chain alone; raises RejectedError. Follow with ``dispatch(..., inspected=True)``."""
        if self._inspect is not None:
            await self._inspect(envelope, direction)

    async def dispatch(
        self, envelope: Envelope, *, direction: Direction = "outbound", deduplicate: bool = False,
        inspected: bool = False,
    ) -> str:
        """Deliver ``envelope`` one step further; returns the route kind taken (for logs/metrics)."""
        if self._inspect is not None and not inspected:
            await self._inspect(envelope, direction)
        peer = envelope.dst_party
        if self.is_local(peer):
            if deduplicate:
                await self._store.deliver(envelope)
            else:
                await self._store.put(envelope)
            self._count(direction, "local", peer, envelope)
            return "local"
        route = self._router.route(peer, envelope.dst_role or "default", now=time.monotonic())
        transports = {ep.transport for ep in route.endpoints}
        if transports & K_LINK_TRANSPORTS:
            await self._store.outbox_put(peer, envelope)
            if self._on_outbox is not None:
                self._on_outbox(peer)
            self._count(direction, "link", peer, envelope)
            return "link"
        await self._forward(envelope, route.endpoints)
        self._count(direction, "grpc", peer, envelope)
        return "grpc"

    async def _forward(self, envelope: Envelope, endpoints: tuple[Endpoint, ...]) -> None:
        failures: list[str] = []
        for endpoint in endpoints:
            started = time.monotonic()
            try:
                await self._forwarder.invoke(endpoint, envelope)
            except PeerUnavailableError as exc:
                self._router.report_failure(endpoint, now=time.monotonic(), reason=str(exc))
                failures.append(str(exc))
                log.warning("forward failed, trying the next endpoint",
                            extra={"fields": {"peer": envelope.dst_party, "endpoint": _name(endpoint),
                                              "error": str(exc)}})
                continue
            except FedgateError:
                raise
            self._router.report_success(endpoint, now=time.monotonic())
            self._metrics.forward_seconds.labels(envelope.dst_party, _name(endpoint)).observe(
                time.monotonic() - started
            )
            return
        raise PeerUnavailableError(
            f"party {envelope.dst_party} unreachable on all {len(endpoints)} endpoint(s): " + "; ".join(failures)
        )

    def _count(self, direction: str, route: str, peer: str, envelope: Envelope) -> None:
        self._metrics.messages.labels(direction, route, peer).inc()
        self._metrics.message_bytes.labels(direction, route, peer).inc(envelope.size)


def _name(endpoint: Endpoint) -> str:
    return f"{endpoint.host}:{endpoint.port}"
