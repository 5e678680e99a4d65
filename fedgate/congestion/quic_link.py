"""The ``quic`` link carrier: reliable byte channels to peer gateways over QUIC (aioquic).

Rules of this module (with :mod:`fedgate.congestion._quic_conn`, the asyncio adapter of the package):

1. One QUIC connection per peer (host, port, expected party, security mode) and link lane; every
   ``connect`` opens one bidirectional stream on it, every stream the peer opens becomes a channel for
   the listener's handler. Lanes (``link.lanes_per_peer``) are separate connections so that
   ``QuicConfig.workers`` can put them in separate processes.
2. The connection's congestion controller is ours (``QuicConfig.congestion_control``), with our pacer
   (:func:`fedgate.congestion._quic_cc.install`); flow-control windows come from ``QuicConfig`` and
   should be >= twice the path's bandwidth-delay product.
3. Transmit batching: everything that wants packets sent (datagrams received, timers, sends) only
   schedules a transmit; one transmit runs per event-loop iteration.
4. Mutual TLS: ``tls`` not None means mutual TLS with this carrier's :class:`QuicIdentity` (the ``[tls]``
   files; aioquic has its own TLS stack, so the ``ssl.SSLContext`` itself is not used). Both ends verify
   the peer after the handshake (:func:`fedgate.congestion._quic_tls.verify_peer`) before any channel
   is surfaced; ``server_hostname`` is the party id the server must prove. ``tls=None`` is insecure
   mode (self-signed, unverified, ``peer_party`` None).
5. Failures are typed: ``connect`` raises PeerUnavailableError naming the endpoint and the reason; when a
   connection dies (peer closed, identity rejected, idle timeout after a path outage) every channel's
   pending and later ``send``/``receive`` raise PeerUnavailableError with that reason. Data received
   before the failure is still returned first. A PING every ``keepalive_s`` keeps an idle link alive;
   a path outage shorter than ``idle_timeout_s`` is survived (QUIC retransmits), a longer one fails.
6. Backpressure: ``send`` waits while the stream holds ``send_buffer_bytes`` unacknowledged bytes.
   Received data is buffered without bound here: the link protocol above bounds it with its credits.
7. qlog: with ``qlog_dir`` set, connections to/from ``qlog_peers`` (party id, host or host:port; empty =
   all) write one qlog JSON trace each when they end.
8. A listener's 1-RTT datagrams for a known connection go straight to it (``_Server``): aioquic's server
   parses every header to find the connection and the connection parses it again. The fast path takes
   only short-header datagrams whose connection id it knows, which aioquic would hand over unchanged;
   everything else goes through aioquic (uses ``QuicServer._protocols`` and ``._configuration``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import socket
import ssl
from functools import partial
from typing import Any, cast

from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from fedgate.congestion._quic_conn import QuicByteChannel, _grow_socket_buffers, _LinkProtocol, _QlogSink
from fedgate.congestion._quic_tls import QuicIdentity, self_signed
from fedgate.congestion._steering import prefix_connection_ids
from fedgate.congestion.config import QuicConfig
from fedgate.errors import ConfigError, PeerUnavailableError
from fedgate.proxy.carrier import ChannelHandler

__all__ = ["QuicByteChannel", "QuicCarrier", "QuicCarrierServer", "QuicIdentity", "create_carrier"]

log = logging.getLogger(__name__)

K_ALPN = "fedgate-link/1"  # ALPN protocol id of the link over QUIC
K_CLOSE_WAIT = 2.0  # seconds aclose() waits for CONNECTION_CLOSE exchanges (qlog traces end there)


class _Server(QuicServer):
    """aioquic's server with the fast path of rule 8."""

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        cid_length = self._configuration.connection_id_length
        if isinstance(data, bytes) and len(data) > cid_length and data[0] & 0xC0 == 0x40:
            # a short header (form bit clear, fixed bit set): the connection id follows the first byte
            protocol = self._protocols.get(data[1 : 1 + cid_length])
            if protocol is not None:
                protocol.datagram_received(data, addr)
                return
        super().datagram_received(data, addr)


class QuicCarrierServer:
    """A listening QUIC endpoint; ``aclose`` closes every connection and handler."""

    def __init__(self, server: QuicServer, protocols: set[_LinkProtocol], tasks: set[asyncio.Task[None]]) -> None:
        self._server = server
        self._protocols = protocols
        self._tasks = tasks
        self._closed = False

    @property
    def port(self) -> int:
        transport = cast(asyncio.DatagramTransport, self._server._transport)
        return int(transport.get_extra_info("sockname")[1])

    @property
    def connections(self) -> int:
        return len(self._protocols)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for protocol in list(self._protocols):
            protocol.close_now("server shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._server.close()


class QuicCarrier:
    """The ``quic`` carrier (see the module rules)."""

    def __init__(self, config: QuicConfig | None = None, *, identity: QuicIdentity | None = None) -> None:
        self.config = config if config is not None else QuicConfig()
        self._identity = identity
        self._clients: dict[tuple[str, int, str | None, bool, int], _LinkProtocol] = {}
        self._locks: dict[tuple[str, int, str | None, bool, int], asyncio.Lock] = {}
        qlog_dir = self.config.qlog_dir
        self._qlog = _QlogSink(pathlib.Path(qlog_dir), self.config.qlog_peers) if qlog_dir else None
        if qlog_dir and not pathlib.Path(qlog_dir).is_dir():
            raise ConfigError(f"{qlog_dir} is not a directory", path="quic.qlog_dir")

    @property
    def name(self) -> str:
        return "quic"

    def _identity_for(self, tls: ssl.SSLContext | None) -> QuicIdentity | None:
        if tls is None:
            return None
        if self._identity is None:
            raise ConfigError("mutual TLS was requested but the QUIC carrier has no identity", path="tls")
        return self._identity

    def _configuration(
        self, *, is_client: bool, identity: QuicIdentity | None, server_name: str | None
    ) -> QuicConfiguration:
        c = self.config
        cfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[K_ALPN],
            idle_timeout=c.idle_timeout_s,
            max_datagram_size=c.max_datagram_size,
            max_data=c.max_data_bytes,
            max_stream_data=c.max_stream_data_bytes,
            initial_rtt=c.initial_rtt_s,
            server_name=server_name,
            verify_mode=ssl.CERT_NONE,  # verified by verify_peer() after the handshake
        )
        if identity is not None:
            try:
                cfg.load_cert_chain(identity.cert_file, identity.key_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load {identity.cert_file} / {identity.key_file}: {exc}", path="tls") from exc
        elif not is_client:
            cfg.certificate, cfg.private_key = self_signed()
        return cfg

    async def connect(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None, timeout: float,
        lane: int = 0,
    ) -> QuicByteChannel:
        identity = self._identity_for(tls)
        key = (host, port, server_hostname, identity is not None, lane)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            protocol = self._clients.get(key)
            if protocol is None or protocol.failure is not None:
                protocol = await self._open(host, port, identity, server_hostname, timeout)
                self._clients[key] = protocol
        return protocol.open_channel()

    async def _open(
        self, host: str, port: int, identity: QuicIdentity | None, party: str | None, timeout: float
    ) -> _LinkProtocol:
        loop = asyncio.get_running_loop()
        where = f"quic {host}:{port}"
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise PeerUnavailableError(f"{where}: cannot resolve: {exc}") from exc
        family, addr = infos[0][0], infos[0][4]
        cfg = self._configuration(is_client=True, identity=identity, server_name=party or host)
        names = [n for n in (party, f"{host}:{port}", host) if n]
        if self._qlog is not None and self._qlog.wanted(names):
            cfg.quic_logger = self._qlog
        connection = QuicConnection(configuration=cfg)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            _grow_socket_buffers(sock)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        except OSError as exc:
            sock.close()
            raise PeerUnavailableError(f"{where}: cannot open a UDP socket: {exc}") from exc
        factory = partial(
            _LinkProtocol,
            connection,
            config=self.config,
            identity=identity,
            expected_party=party,
            on_channel=None,
            on_closed=None,
            qlog=self._qlog,
            sock=sock,
        )
        transport, protocol = await loop.create_datagram_endpoint(factory, sock=sock)
        link = protocol
        if self._qlog is not None and cfg.quic_logger is not None:
            self._qlog.label(connection._quic_logger, names)
        link.connect(addr)
        try:
            await asyncio.wait_for(link.wait_verified(), timeout)
        except TimeoutError as exc:
            link.close_now("handshake timeout")
            transport.close()
            raise PeerUnavailableError(f"{where}: no QUIC handshake within {timeout:g} s") from exc
        except PeerUnavailableError:
            transport.close()
            raise
        return link

    async def listen(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, handler: ChannelHandler
    ) -> QuicCarrierServer:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
            sock = socket.socket(infos[0][0], socket.SOCK_DGRAM)
            try:
                sock.bind(infos[0][4])
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            raise PeerUnavailableError(f"quic {host}:{port}: cannot listen: {exc}") from exc
        return await self.listen_on(sock, tls=tls, handler=handler)

    async def listen_on(
        self, sock: socket.socket, *, tls: ssl.SSLContext | None, handler: ChannelHandler,
        cid_prefix: int | None = None,
    ) -> QuicCarrierServer:
        """Like ``listen``, on a bound UDP socket (e.g. one of an SO_REUSEPORT group); takes it over.

        ``cid_prefix``: the first byte of every connection id this server issues (the socket's place
        in a group steered by connection id, :mod:`fedgate.congestion._steering`).
        """
        identity = self._identity_for(tls)
        cfg = self._configuration(is_client=False, identity=identity, server_name=None)
        if self._qlog is not None:
            cfg.quic_logger = self._qlog
        _grow_socket_buffers(sock)
        protocols: set[_LinkProtocol] = set()
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()

        async def run(channel: QuicByteChannel) -> None:
            try:
                await handler(channel)
            except PeerUnavailableError as exc:
                log.info("%s: %s", channel.description, exc)
            except Exception:
                log.exception("%s: channel handler failed", channel.description)
            finally:
                await channel.aclose()

        def on_channel(channel: QuicByteChannel) -> None:
            task = loop.create_task(run(channel))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def create_protocol(connection: QuicConnection, stream_handler: Any = None) -> _LinkProtocol:
            if cid_prefix is not None:
                prefix_connection_ids(connection, cid_prefix)
            protocol = _LinkProtocol(
                connection,
                config=self.config,
                identity=identity,
                expected_party=None,
                on_channel=on_channel,
                on_closed=protocols.discard,
                qlog=self._qlog,
                sock=sock,
            )
            protocols.add(protocol)
            return protocol

        _, server = await loop.create_datagram_endpoint(
            lambda: _Server(configuration=cfg, create_protocol=create_protocol), sock=sock
        )
        return QuicCarrierServer(server, protocols, tasks)

    async def aclose(self) -> None:
        """Close every client connection; waits up to K_CLOSE_WAIT for the closing handshakes."""
        protocols = list(self._clients.values())
        self._clients.clear()
        for protocol in protocols:
            if not protocol.terminated:
                protocol.close_now("carrier closing")
        waits = [protocol.wait_closed() for protocol in protocols if not protocol.terminated]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), K_CLOSE_WAIT)
        for protocol in protocols:
            if protocol._transport is not None:
                protocol._transport.close()


def create_carrier(config: QuicConfig | None = None, *, identity: QuicIdentity | None = None) -> Any:
    """The ``quic`` carrier: in this process, or in ``config.workers`` worker processes."""
    config = config if config is not None else QuicConfig()
    if config.workers:
        from fedgate.congestion.quic_workers import QuicWorkerCarrier

        return QuicWorkerCarrier(config, identity=identity)
    return QuicCarrier(config, identity=identity)
