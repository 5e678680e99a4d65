"""The gateway process: builds every part from the config and runs them under one TaskGroup.

Rules of this module:

1. This is the one place where parts are wired together; each part receives only its own config
   section and the shared registry / clock it needs.
2. Life cycle: open the store, load the route table, start the servers, then tell systemd READY=1.
   SIGTERM / SIGINT: STOPPING=1, refuse new work, wake parked pops, let in-flight calls finish within
   ``gateway.drain_timeout_s``, close the store last. SIGHUP: RELOADING=1, reload the route table
   (a bad file keeps the old one), READY=1.
3. A part that fails brings the whole gateway down with the error logged (systemd restarts it);
   nothing is swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry

from fedgate import __version__
from fedgate.audit.config import AuditConfig
from fedgate.audit.filters import Direction, Reject
from fedgate.config import FedgateConfig, parse_hostport
from fedgate.errors import ConfigError, RejectedError
from fedgate.metrics import GatewayMetrics, MetricsServer, new_registry
from fedgate.proxy import protos as _protos  # noqa: F401 - generated stubs are importable
from fedgate.proxy.dispatch import Direction as DispatchDirection
from fedgate.proxy.dispatch import Dispatcher, Inspector
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.front_osx import OsxProtocolServicer, OsxTransportServicer
from fedgate.proxy.front_rollsite import DataTransferServicer, RouteServicer
from fedgate.proxy.link_events import Rejection
from fedgate.proxy.links import InboundHook, LinkManager, RejectedHook
from fedgate.proxy.osx_client import OsxForwarder, server_options
from fedgate.proxy.protos import osx_pb2_grpc, proxy_pb2_grpc
from fedgate.proxy.route_reload import RouteReloader
from fedgate.proxy.routing import Router
from fedgate.proxy.rpc import RpcObserver
from fedgate.proxy.store import SqliteStore
from fedgate.proxy.store_api import OutboxItem
from fedgate.sdnotify import SystemdNotifier

if TYPE_CHECKING:
    from fedgate.audit.chain import AuditChain
    from fedgate.audit.ledger_writer import LedgerWriter

__all__ = ["BoundPorts", "Gateway"]

log = logging.getLogger("fedgate.gateway")

K_GAUGE_INTERVAL = 1.0  # seconds between store gauge refreshes and watchdog pings (at most)


def _audit_hooks(
    chain: AuditChain, ledger: LedgerWriter | None, *, ack_after_commit: bool
) -> tuple[Inspector, InboundHook, RejectedHook, Callable[[], Awaitable[None]] | None]:
    """The audit chain and ledger as the dispatcher's and the link's hooks, and the ledger's commit
    barrier (None unless ``ack_after_commit``): the front awaits it per message before it answers; the
    link receiver once per delivery batch, before it stores and acknowledges (group commit)."""
    synced = ledger.synced if ledger is not None and ack_after_commit else None

    def audit(envelope: Envelope, direction: DispatchDirection) -> Reject | None:
        way: Direction = "out" if direction == "outbound" else "in"
        now = time.time()
        result = chain.inspect(envelope, way, now=now)
        if ledger is not None:
            verdict, rule = result.ledger_verdict
            ledger.record(envelope, way, verdict, rule, now=now)
        return result.verdict if isinstance(result.verdict, Reject) else None

    async def inspect(envelope: Envelope, direction: DispatchDirection) -> None:
        reject = audit(envelope, direction)
        if synced is not None:
            await synced()
        if reject is not None:
            raise RejectedError(reject.rule, reject.detail)

    async def on_inbound(envelope: Envelope) -> Rejection | None:
        reject = audit(envelope, "inbound")
        return None if reject is None else Rejection(envelope.message_id, reject.rule, reject.detail)

    async def on_rejected(item: OutboxItem, rejection: Rejection) -> None:
        log.error("party %s rejected message %s (session %s, topic %s): %s: %s", item.peer,
                  item.envelope.message_id, item.envelope.session_id, item.envelope.topic, rejection.rule,
                  rejection.detail)
        if ledger is not None:
            ledger.record(item.envelope, "out", "peer-reject", rejection.rule, now=time.time())

    return inspect, on_inbound, on_rejected, synced


@dataclass(frozen=True, slots=True)
class BoundPorts:
    """The ports actually bound (a configured port 0 picks a free one)."""

    front: int
    metrics: int | None


class Gateway:
    """One fedgate appliance process."""

    def __init__(self, config: FedgateConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or new_registry()
        self.metrics = GatewayMetrics.create(self.registry)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._ready = asyncio.Event()
        self.ports: BoundPorts | None = None
        self.store: SqliteStore | None = None
        self.router: Router | None = None
        self.links: LinkManager | None = None
        self._notifier = SystemdNotifier.from_environment()

    # -- control -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    async def wait_ready(self) -> BoundPorts:
        await self._ready.wait()
        assert self.ports is not None
        return self.ports

    # -- run -----------------------------------------------------------------------------------

    async def run(self, *, install_signals: bool = True) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        if install_signals:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self.metrics.info.labels(config.display_name, __version__, ",".join(config.gateway.party_ids)).set(1)

        reloader = RouteReloader(config.routes, registry=self.registry)
        reloader.load_initial()
        self.router = reloader.router
        async with contextlib.AsyncExitStack() as stack:
            # Resources are closed in reverse order of opening, whatever fails on the way.
            store = self.store = await SqliteStore.open(config.store,
                                                        max_message_bytes=config.front.max_message_bytes)
            stack.push_async_callback(store.aclose)
            forwarder = OsxForwarder(max_message_bytes=config.front.max_message_bytes,
                                     timeout=config.front.forward_timeout_s)
            stack.push_async_callback(forwarder.aclose)
            audit = self._audit_config()
            inspect: Inspector | None = None
            on_inbound: InboundHook | None = None
            on_rejected: RejectedHook | None = None
            inbound_synced: Callable[[], Awaitable[None]] | None = None
            ledger: LedgerWriter | None = None
            if audit.enabled:
                from fedgate.audit.chain import AuditChain
                from fedgate.audit.ledger_writer import LedgerWriter

                chain = AuditChain.from_config(audit, registry=self.registry)
                if audit.ledger:
                    ledger = LedgerWriter.from_config(audit)
                    stack.push_async_callback(ledger.aclose)
                inspect, on_inbound, on_rejected, inbound_synced = _audit_hooks(
                    chain, ledger, ack_after_commit=audit.ledger_ack_after_commit)
            links = self.links = LinkManager(config, store=store, router=reloader.router, registry=self.registry,
                                             on_inbound=on_inbound, on_rejected=on_rejected,
                                             inbound_synced=inbound_synced)
            stack.push_async_callback(links.aclose)
            dispatcher = Dispatcher(
                party_ids=config.gateway.party_ids, store=store, router=reloader.router, forwarder=forwarder,
                metrics=self.metrics, inspect=inspect, on_outbox=links.wake,
            )
            server, data_transfer = self._front(dispatcher, store, reloader.router)
            stack.push_async_callback(data_transfer.aclose)
            host, port = parse_hostport(config.front.listen, path="front.listen")
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if config.tls.front:
                bound = server.add_secure_port(address, self._front_credentials())
            else:
                bound = server.add_insecure_port(address)
            if bound == 0:
                raise ConfigError(f"cannot listen on {config.front.listen}: address in use or not local",
                                  path="front.listen")
            await links.start()
            if config.compute.enabled:
                from fedgate.compute.service import serve_compute

                compute = await serve_compute(config.compute)
                stack.push_async_callback(compute.stop, config.gateway.drain_timeout_s)
            metrics_server = self._metrics_server()
            if metrics_server is not None:
                stack.callback(metrics_server.close)
            await server.start()
            stack.push_async_callback(server.stop, None)
            self.ports = BoundPorts(front=bound, metrics=metrics_server.port if metrics_server else None)
            log.info("gateway ready", extra={"fields": {
                "name": config.display_name, "parties": ",".join(config.gateway.party_ids),
                "front": f"{host}:{bound}", "link": config.link.listen, "metrics": config.metrics.listen or "off",
                "routes": str(config.routes.file)}})
            self._notifier.ready(status=f"serving parties {','.join(config.gateway.party_ids)} on {host}:{bound}")
            self._ready.set()
            async with asyncio.TaskGroup() as tg:
                ledger_task = tg.create_task(ledger.run()) if ledger is not None else None
                tg.create_task(reloader.run(self._stop))
                tg.create_task(self._housekeeping(store))
                tg.create_task(self._reloads(reloader))
                await self._stop.wait()
                log.info("stopping: draining in-flight calls",
                         extra={"fields": {"grace_s": config.gateway.drain_timeout_s}})
                self._notifier.stopping()
                await store.release_waiters("gateway is shutting down")
                await server.stop(grace=config.gateway.drain_timeout_s)
                await links.aclose()
                if ledger_task is not None:
                    ledger_task.cancel()  # the exit stack's ledger.aclose() writes what is still queued
        log.info("gateway stopped")

    def _audit_config(self) -> AuditConfig:
        """The audit section, with the ledger files next to the store unless set explicitly.

        ``var/fedgate.db`` gets ``var/ledger.db`` and ``var/ledger-signing.key`` (what ``fedgate audit``
        looks for by default); another store name ``x.db`` gets ``x-ledger.db`` and ``x-ledger-signing.key``,
        so gateways that keep their stores in one directory do not share a ledger.
        """
        audit, default = self.config.audit, AuditConfig()
        store = self.config.store.path
        prefix = "" if store.stem == "fedgate" else f"{store.stem}-"
        ledger_path = (store.with_name(f"{prefix}ledger.db") if audit.ledger_path == default.ledger_path
                       else audit.ledger_path)
        signing_key = (store.with_name(f"{prefix}ledger-signing.key") if audit.signing_key == default.signing_key
                       else audit.signing_key)
        return dataclasses.replace(audit, ledger_path=ledger_path, signing_key=signing_key)

    def _front(
        self, dispatcher: Dispatcher, store: SqliteStore, router: Router
    ) -> tuple[grpc.aio.Server, DataTransferServicer]:
        """The FATE-facing gRPC server with every front-end service registered."""
        front = self.config.front
        rpc = RpcObserver(self.metrics)
        server = grpc.aio.server(options=server_options(front.max_message_bytes), maximum_concurrent_rpcs=None)
        osx_pb2_grpc.add_PrivateTransferTransportServicer_to_server(
            OsxTransportServicer(dispatcher=dispatcher, store=store, max_pop_wait_s=front.max_pop_wait_s, rpc=rpc),
            server)
        osx_pb2_grpc.add_PrivateTransferProtocolServicer_to_server(
            OsxProtocolServicer(dispatcher=dispatcher, rpc=rpc), server)
        data_transfer = DataTransferServicer(
            dispatcher=dispatcher, router=router, store=store, rpc=rpc, max_message_bytes=front.max_message_bytes,
            control_timeout_s=front.control_timeout_s, forward_timeout_s=front.forward_timeout_s,
        )
        proxy_pb2_grpc.add_DataTransferServiceServicer_to_server(data_transfer, server)
        proxy_pb2_grpc.add_RouteServiceServicer_to_server(RouteServicer(router=router, rpc=rpc), server)
        return server, data_transfer

    def _front_credentials(self) -> grpc.ServerCredentials:
        """TLS for the front: the gateway's certificate; client certificates required when a CA is set."""
        tls = self.config.tls
        assert tls.cert_file is not None and tls.key_file is not None
        try:
            key, chain = tls.key_file.read_bytes(), tls.cert_file.read_bytes()
            ca = tls.ca_file.read_bytes() if tls.ca_file else None
        except OSError as exc:
            raise ConfigError(f"cannot read the front's TLS files: {exc}", path="tls") from exc
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)

    def _metrics_server(self) -> MetricsServer | None:
        if not self.config.metrics.listen:
            return None
        host, port = parse_hostport(self.config.metrics.listen, path="metrics.listen")
        try:
            server = MetricsServer(self.registry, host, port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.config.metrics.listen}: {exc.strerror}",
                              path="metrics.listen") from exc
        server.start()
        return server

    async def _reloads(self, reloader: RouteReloader) -> None:
        while not self._stop.is_set():
            reload_wait = asyncio.ensure_future(self._reload.wait())
            stop_wait = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({reload_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            reload_wait.cancel()
            stop_wait.cancel()
            if self._reload.is_set():
                self._reload.clear()
                self._notifier.reloading()
                ok = reloader.reload()
                self._notifier.ready(status="route table reloaded" if ok else "route table reload failed; old kept")

    async def _housekeeping(self, store: SqliteStore) -> None:
        interval = K_GAUGE_INTERVAL
        watchdog = self._notifier.watchdog_interval()
        if watchdog is not None:
            interval = min(interval, watchdog)
        last_prune = time.monotonic()
        while not self._stop.is_set():
            stats = store.statistics()
            self.metrics.queued_messages.set(stats.queued_messages)
            self.metrics.queued_bytes.set(stats.queued_bytes)
            self.metrics.outbox_messages.set(stats.outbox_messages)
            self.metrics.parked_pops.set(stats.parked_pops)
            self._notifier.watchdog()
            if time.monotonic() - last_prune > 3600:
                last_prune = time.monotonic()
                await store.prune_seen()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)
