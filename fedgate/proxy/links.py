"""The gateway's links to peer gateways: one LinkSender per peer party, one listener per carrier.

Rules of this module:

1. A peer's sender starts when its outbox first gets a message (or at start-up when the outbox
   already holds some) and runs until the gateway stops; it reconnects forever with backoff.
2. Every connection attempt looks the route up again, so a reloaded route table takes effect at the
   next reconnect; endpoints are tried in the Router's health order and their health is fed back.
3. ``transport = "auto"`` uses RDMA only when both ends share a datacenter label and this host has
   a device, else TCP; the reason is logged once per endpoint.
4. Links are mutually authenticated with TLS 1.3 (the ``[tls]`` files) unless ``link.insecure`` is
   set; without either, no listener starts and senders refuse to connect, each saying why.
5. Inbound links are accepted only from parties the route table knows (or ``default`` when
   ``default_allow``); messages pass the inbound audit hook before they are stored.
6. ``link.lanes_per_peer`` = N > 1 runs N senders per peer, each owning the messages of one lane
   (:class:`~fedgate.proxy.store_api.Lane`: by session and topic) over its own carrier connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry

from fedgate.config import FedgateConfig, parse_hostport
from fedgate.congestion import CongestionStatistics
from fedgate.errors import ConfigError, FedgateError, PeerUnavailableError, RouteError
from fedgate.proxy.carrier import ByteChannel, Carrier, CarrierServer
from fedgate.proxy.carriers import load_carrier
from fedgate.proxy.dispatch import K_LINK_TRANSPORTS
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import LinkParams
from fedgate.proxy.link_events import Rejection
from fedgate.proxy.link_listener import LinkListener, LinkListenerStatistics
from fedgate.proxy.link_metrics import CarrierCollector, LinkMetrics, QuicWorkerCollector
from fedgate.proxy.link_sender import LinkSender, LinkSenderStatistics
from fedgate.proxy.routing import Endpoint, Router
from fedgate.proxy.store import SqliteStore, outbox_of
from fedgate.proxy.store_api import Lane, OutboxItem

__all__ = ["InboundHook", "LinkManager", "RejectedHook", "choose_link_transport", "make_carrier"]

log = logging.getLogger("fedgate.links")

InboundHook = Callable[[Envelope], Awaitable[Rejection | None]]
RejectedHook = Callable[[OutboxItem, Rejection], Awaitable[None]]


def choose_link_transport(config: FedgateConfig, endpoint: Endpoint) -> tuple[str, str]:
    """The carrier for a link endpoint, and why (``auto``: rdma in the same datacenter with a device)."""
    if endpoint.transport != "auto":
        return endpoint.transport, f"the route names {endpoint.transport}"
    from fedgate.rdma.probe import choose_transport, rdma_available

    return choose_transport(
        "auto", local_datacenter=config.gateway.datacenter, peer_datacenter=endpoint.datacenter,
        local_rdma=rdma_available(config.rdma.device), peer_rdma=True,
    )


def make_carrier(config: FedgateConfig, name: str) -> Carrier:
    """Build carrier ``name`` from its config section (and this gateway's TLS identity for QUIC)."""
    if name == "quic":
        from fedgate.congestion.quic_link import QuicIdentity

        return load_carrier(name, config.quic, identity=QuicIdentity.from_tls_config(config.tls))
    if name == "rdma":
        return load_carrier(name, config.rdma)
    return load_carrier(name)


async def close_carrier(carrier: Carrier) -> None:
    """Release what a carrier holds (the RDMA device, QUIC sockets and worker processes), if anything."""
    close = getattr(carrier, "aclose", None)
    if close is not None:
        await close()


class LinkManager:
    """Owns the link senders and listeners of one gateway."""

    def __init__(
        self,
        config: FedgateConfig,
        *,
        store: SqliteStore,
        router: Router,
        registry: CollectorRegistry,
        on_inbound: InboundHook | None = None,
        on_rejected: RejectedHook | None = None,
        inbound_synced: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._config = config
        self._inbound_synced = inbound_synced
        self._store = store
        self._router = router
        self._metrics = LinkMetrics(registry)
        self._registry = registry
        self._collectors = (CarrierCollector(self.carrier_statistics),
                            QuicWorkerCollector(lambda: self._carriers.get("quic")))
        for collector in self._collectors:
            registry.register(collector)
        self._on_inbound = on_inbound
        self._on_rejected = on_rejected
        self._party = config.gateway.party_ids[0]
        self._params = LinkParams.from_config(config.link, local_party=self._party,
                                              max_message_bytes=config.front.max_message_bytes)
        self._carriers: dict[str, Carrier] = {}
        self._servers: list[CarrierServer] = []
        self._senders: dict[str, LinkSender] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: LinkListener | None = None
        self._auto_reasons: set[tuple[str, int, str]] = set()
        self._closing = False
        self._client_tls, self._server_tls = self._tls_contexts()

    # -- TLS ------------------------------------------------------------------------------------------

    def _tls_contexts(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
        tls = self._config.tls
        if tls.cert_file is None or tls.key_file is None or tls.ca_file is None:
            return None, None
        from fedgate.proxy.certs import client_context, server_context

        try:
            return (client_context(tls.ca_file, tls.cert_file, tls.key_file),
                    server_context(tls.ca_file, tls.cert_file, tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the link TLS identity: {exc}", path="tls") from exc

    @property
    def secure(self) -> bool:
        return self._client_tls is not None

    def _carrier(self, name: str) -> Carrier:
        carrier = self._carriers.get(name)
        if carrier is None:
            carrier = self._carriers[name] = make_carrier(self._config, name)
        return carrier

    # -- listening ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the listeners and the senders of peers whose outbox is not empty."""
        if not self.secure and not self._config.link.insecure:
            log.warning("links disabled: set [tls] ca_file, cert_file and key_file (see `fedgate certs`), "
                        "or link.insecure = true for a trusted lab; outbound link messages wait in the outbox")
        else:
            self._listener = LinkListener(params=self._params, inbox=self._store, allow=self._allowed,
                                          on_inbound=self._on_inbound, inbound_synced=self._inbound_synced,
                                          metrics=self._metrics)
            host, port = parse_hostport(self._config.link.listen, path="link.listen")
            await self._listen("tcp", host, port)
            if self._config.link.quic:
                await self._listen("quic", host, port)
            if self._config.link.rdma_listen:
                rhost, rport = parse_hostport(self._config.link.rdma_listen, path="link.rdma_listen")
                await self._listen("rdma", rhost, rport)
        for peer in await self._store.outbox_peers():
            self.wake(peer)

    async def _listen(self, name: str, host: str, port: int) -> None:
        assert self._listener is not None
        try:
            server = await self._carrier(name).listen(host, port, tls=self._server_tls, handler=self._listener.handle)
        except (FedgateError, OSError) as exc:
            if name == "tcp":
                raise ConfigError(f"cannot listen on {host}:{port}: {exc}", path="link.listen") from exc
            log.warning("no %s link listener on %s:%s: %s", name, host, port, exc)
            return
        self._servers.append(server)
        log.info("link listener", extra={"fields": {"carrier": name, "listen": f"{host}:{server.port}",
                                                    "tls": self.secure}})

    def _allowed(self, party: str) -> bool:
        try:
            self._router.route(party, "default", now=time.monotonic())
        except RouteError:
            log.warning("refusing a link from party %s: the route table does not know it", party)
            return False
        return True

    # -- sending --------------------------------------------------------------------------------------

    def wake(self, peer: str) -> None:
        """Make sure the senders of ``peer`` run (called when its outbox gets a message)."""
        if self._closing or peer in self._senders:
            return
        if not self.secure and not self._config.link.insecure:
            return
        lanes = self._config.link.lanes_per_peer
        for index in range(lanes):
            lane = Lane(index, lanes) if lanes > 1 else None
            sender = LinkSender(
                peer=peer, params=self._params, outbox=outbox_of(self._store, lane), dial=self._dialer(peer, index),
                backoff_initial_s=self._config.link.backoff_initial_s, backoff_max_s=self._config.link.backoff_max_s,
                metrics=self._metrics, on_rejected=self._on_rejected, lane=index,
            )
            name = peer if index == 0 else f"{peer}#{index}"
            self._senders[name] = sender
            task = asyncio.get_running_loop().create_task(sender.run(), name=f"link-sender-{name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _dialer(self, peer: str, lane: int = 0) -> Callable[[], Awaitable[ByteChannel]]:
        async def dial() -> ByteChannel:
            route = self._router.route(peer, "default", now=time.monotonic())
            candidates = [ep for ep in route.endpoints if ep.transport in K_LINK_TRANSPORTS]
            if not candidates:
                raise PeerUnavailableError(f"party {peer} has no link endpoint (tcp, quic, rdma, auto) in "
                                           f"{self._router.table.source or 'the route table'}")
            failures = []
            for endpoint in candidates:
                name = self._transport_for(endpoint)
                try:
                    channel = await self._carrier(name).connect(
                        endpoint.host, endpoint.port, tls=self._client_tls, server_hostname=None,
                        timeout=self._config.link.connect_timeout_s, lane=lane,
                    )
                except (FedgateError, OSError) as exc:
                    self._router.report_failure(endpoint, now=time.monotonic(), reason=str(exc))
                    failures.append(f"{name} {endpoint.host}:{endpoint.port}: {exc}")
                    continue
                self._router.report_success(endpoint, now=time.monotonic())
                return channel
            raise PeerUnavailableError("; ".join(failures))

        return dial

    def _transport_for(self, endpoint: Endpoint) -> str:
        if endpoint.transport != "auto":
            return endpoint.transport
        name, why = choose_link_transport(self._config, endpoint)
        key = (endpoint.host, endpoint.port, name)
        if key not in self._auto_reasons:
            self._auto_reasons.add(key)
            log.info("transport auto for %s:%s: %s (%s)", endpoint.host, endpoint.port, name, why)
        return name

    # -- observing and stopping ---------------------------------------------------------------------------

    def sender_statistics(self) -> dict[str, LinkSenderStatistics]:
        """Per sender: the peer's party id for lane 0, ``party#N`` for lane N."""
        return {name: sender.statistics() for name, sender in self._senders.items()}

    def carrier_statistics(self) -> dict[str, CongestionStatistics]:
        """Per sender with an open connection whose carrier has a congestion controller (QUIC)."""
        out: dict[str, CongestionStatistics] = {}
        for name, sender in self._senders.items():
            stats = sender.carrier_statistics()
            if stats is not None:
                out[name] = stats
        return out

    def listener_statistics(self) -> LinkListenerStatistics | None:
        return None if self._listener is None else self._listener.statistics()

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        for collector in self._collectors:
            with contextlib.suppress(KeyError):
                self._registry.unregister(collector)
        await asyncio.gather(*(s.aclose() for s in self._senders.values()), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.aclose()
        for carrier in self._carriers.values():
            with contextlib.suppress(Exception):
                await close_carrier(carrier)
