"""The ``tcp`` carrier: asyncio streams, TLS 1.3 with mutual authentication (or plain text for tests).

Rules of this module:

1. With a TLS context the peer's party is read from its verified certificate (see
   :mod:`fedgate.proxy.certs`); a certificate without exactly one party SAN is refused, on both
   ends, with a log line. Whether it is the *right* party is the link's check (it knows the route).
2. ``tls=None`` is plain text: ``peer_party`` is None and the link falls back to HELLO's claim. Only
   for tests and labs (``link.insecure``).
3. Foreign errors (OSError, ssl.SSLError, timeouts) become PeerUnavailableError naming the endpoint.
4. Large reads and writes: the stream buffer is ``K_STREAM_LIMIT``, reads take up to ``K_READ_BYTES``,
   writes wait (drain) only once the transport holds more than ``K_WRITE_HIGH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from fedgate.errors import PeerUnavailableError
from fedgate.proxy.carrier import ChannelHandler
from fedgate.proxy.certs import party_from_peercert

__all__ = ["TcpCarrier", "TcpChannel", "TcpServer", "create_carrier"]

log = logging.getLogger("fedgate.link.tcp")

K_STREAM_LIMIT = 4 * 1024 * 1024  # bytes buffered by the StreamReader before reading pauses
K_READ_BYTES = 1024 * 1024  # bytes asked for per receive()
K_WRITE_HIGH = 4 * 1024 * 1024  # bytes queued in the transport before send() waits
K_TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds the server gives a client to finish TLS
K_CLOSE_TIMEOUT = 0.5  # seconds a close waits to flush before the connection is aborted


class TcpChannel:
    """A ByteChannel over an asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer_party: str | None,
                 description: str) -> None:
        self._reader, self._writer = reader, writer
        self._peer_party, self._description = peer_party, description
        writer.transport.set_write_buffer_limits(high=K_WRITE_HIGH)

    @property
    def peer_party(self) -> str | None:
        return self._peer_party

    @property
    def description(self) -> str:
        return self._description

    async def send(self, data: bytes | memoryview) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def receive(self) -> bytes:
        return await self._reader.read(K_READ_BYTES)

    async def aclose(self) -> None:
        if self._writer.is_closing():
            return
        self._writer.close()
        try:
            async with asyncio.timeout(K_CLOSE_TIMEOUT):
                await self._writer.wait_closed()
        except TimeoutError:  # unsent data towards a peer that is gone: drop it
            self._writer.transport.abort()
        except Exception:  # already broken: closing is all we wanted
            self._writer.transport.abort()

    def abort(self) -> None:
        """Drop the connection at once, without TLS close_notify (tests: a cut cable)."""
        self._writer.transport.abort()


def _peer_party(writer: asyncio.StreamWriter, tls: ssl.SSLContext | None, where: str) -> str | None:
    if tls is None:
        return None
    ssl_object = writer.get_extra_info("ssl_object")
    party = party_from_peercert(ssl_object.getpeercert() if ssl_object is not None else None)
    if party is None:
        raise PeerUnavailableError(f"{where}: the peer's certificate names no party (SAN URI fedgate:party:<id>)")
    return party


class TcpServer:
    """A listening tcp carrier; ``aclose`` stops accepting and closes the open channels."""

    def __init__(self, server: asyncio.Server, channels: set[TcpChannel]) -> None:
        self._server, self._channels = server, channels

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        self._server.close()
        for channel in list(self._channels):
            await channel.aclose()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self._server.wait_closed()


class TcpCarrier:
    """The ``tcp`` link carrier."""

    @property
    def name(self) -> str:
        return "tcp"

    async def connect(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None, timeout: float,
        lane: int = 0,
    ) -> TcpChannel:
        where = f"tcp {host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=(server_hostname or host) if tls else None,
                    limit=K_STREAM_LIMIT,
                )
        except TimeoutError as exc:
            raise PeerUnavailableError(f"{where}: no connection within {timeout} s") from exc
        except ssl.SSLError as exc:
            raise PeerUnavailableError(f"{where}: TLS failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise PeerUnavailableError(f"{where}: {exc.strerror or exc}") from exc
        try:
            party = _peer_party(writer, tls, where)
        except PeerUnavailableError:
            writer.transport.abort()
            raise
        return TcpChannel(reader, writer, peer_party=party, description=where)

    async def listen(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, handler: ChannelHandler
    ) -> TcpServer:
        channels: set[TcpChannel] = set()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            addr = writer.get_extra_info("peername")
            where = f"tcp {addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "tcp ?"
            try:
                party = _peer_party(writer, tls, where)
            except PeerUnavailableError as exc:
                log.error("refusing link from %s: %s", where, exc)
                writer.transport.abort()
                return
            channel = TcpChannel(reader, writer, peer_party=party, description=where)
            channels.add(channel)
            try:
                await handler(channel)
            finally:
                channels.discard(channel)
                await channel.aclose()

        try:
            server = await asyncio.start_server(
                accepted, host, port, ssl=tls, limit=K_STREAM_LIMIT,
                ssl_handshake_timeout=K_TLS_HANDSHAKE_TIMEOUT if tls else None,
            )
        except OSError as exc:
            raise PeerUnavailableError(f"cannot listen on tcp {host}:{port}: {exc.strerror or exc}") from exc
        return TcpServer(server, channels)


def create_carrier() -> TcpCarrier:
    """The registry's factory for ``transport = "tcp"`` (see :mod:`fedgate.proxy.carriers`)."""
    return TcpCarrier()
