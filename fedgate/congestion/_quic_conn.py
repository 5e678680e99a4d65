"""One QUIC connection of the ``quic`` carrier: our controller installed, peer verified, streams as channels.

Rules of this module (an asyncio adapter; :mod:`fedgate.congestion.quic_link` builds on it):

1. ``_LinkProtocol`` is aioquic's ``QuicConnectionProtocol`` with (a) our controller and pacer installed
   before the first packet, (b) one transmit per event-loop iteration, sent with UDP GSO where the
   kernel has it, (c) the peer verified after the handshake and before any channel is surfaced, (d) a
   keepalive PING every ``keepalive_s``.
2. A client is ready once it verified the server and the server confirmed the handshake, so a
   server's rejection of our certificate fails ``connect`` with the server's reason.
3. When the connection ends, every channel's pending and later calls raise PeerUnavailableError with
   the reason; data received before is still returned first.
4. aioquic's clock is ``time.monotonic()``, not ``loop.time()``: uvloop's loop time is libuv's
   millisecond tick, so every send time, ACK time and RTT sample was cut to whole milliseconds. At
   20 ms RTT that is up to 5% of a delivery-rate sample's interval, and BBR's max filter keeps the
   samples it shortened. Timers are armed with
   ``call_later(deadline - now)``; one that fires early is handled as due (``_handle_timer``).
5. aioquic 1.7.2 internals used here: ``QuicConnection._initialize``, ``.tls._request_client_certificate``,
   ``.tls._peer_certificate(_chain)``, ``._handshake_confirmed``, ``._pacing_at``, ``._streams[..].sender``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import pathlib
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.logger import QuicLogger, QuicLoggerTrace

from fedgate.congestion import CongestionStatistics, create_controller
from fedgate.congestion._quic_buffer import adopt
from fedgate.congestion._quic_cc import AioquicController, install
from fedgate.congestion._quic_tls import QuicIdentity, verify_peer
from fedgate.congestion.config import QuicConfig
from fedgate.errors import LocalError, PeerUnavailableError

__all__ = ["QuicByteChannel"]

log = logging.getLogger("fedgate.congestion.quic_link")

K_CHUNK = 256 * 1024  # bytes handed to aioquic per send_stream_data call
K_SOCKET_BUFFER = 8 * 1024 * 1024  # bytes of kernel UDP buffer requested per socket
K_IDENTITY_REJECTED = 0x10  # application error code: the peer's certificate was rejected
K_CLOSED_BY_US = 0x0  # application error code of an orderly close
K_UDP_SEGMENT = 103  # UDP_SEGMENT (linux/udp.h): one sendmsg carries several equal-size datagrams (GSO)
K_GSO_MAX_SEGMENTS = 40  # datagrams per GSO send (the kernel allows 64 and 64 KiB in all)
K_GSO_MAX_BYTES = 65000  # bytes per GSO send
K_PAST = 1e-6  # seconds added to a fired timer's deadline, so what was due then counts as overdue

_clock = time.monotonic  # aioquic's clock (rule 4): not loop.time(), which uvloop keeps in whole ms


def _grow_socket_buffers(sock: socket.socket) -> None:
    """Ask for large kernel buffers (FORCE works as root, past rmem_max); best effort."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        for opt in (force, plain):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, K_SOCKET_BUFFER)
                break
            except OSError:
                continue


class _QlogSink(QuicLogger):
    """Keeps traces in memory; writes the wanted ones to ``directory`` when their connection ends."""

    def __init__(self, directory: pathlib.Path, peers: tuple[str, ...]) -> None:
        super().__init__()
        self._dir = directory
        self._peers = set(peers)
        self._labels: dict[int, str] = {}

    def wanted(self, names: list[str]) -> bool:
        return not self._peers or bool(self._peers.intersection(names))

    def label(self, trace: QuicLoggerTrace | None, names: list[str]) -> None:
        if trace is not None and self.wanted(names):
            self._labels[id(trace)] = names[0]

    def end_trace(self, trace: QuicLoggerTrace) -> None:
        label = self._labels.pop(id(trace), None)
        with contextlib.suppress(ValueError):
            self._traces.remove(trace)
        if label is None:
            return
        data = trace.to_dict()
        odcid = data.get("common_fields", {}).get("ODCID", "conn")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        path = self._dir / f"{safe}-{odcid}.qlog"
        try:
            path.write_text(json.dumps({"qlog_format": "JSON", "qlog_version": "0.3", "traces": [data]}))
        except OSError as exc:
            log.warning("cannot write qlog trace %s: %s", path, exc)


class _LinkProtocol(QuicConnectionProtocol):
    """One QUIC connection: controller installed, peer verified, streams turned into channels."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        config: QuicConfig,
        identity: QuicIdentity | None,
        expected_party: str | None,
        on_channel: Callable[[QuicByteChannel], None] | None,
        on_closed: Callable[[_LinkProtocol], None] | None,
        qlog: _QlogSink | None,
        sock: socket.socket | None = None,
    ) -> None:
        super().__init__(quic)
        self._config = config
        self._gso_sock = sock
        controller = create_controller(config.congestion_control, max_datagram_size=config.max_datagram_size)
        self.cc: AioquicController = install(quic, controller, bucket_s=config.pacer_bucket_s)
        self._identity = identity
        self._expected = expected_party
        self._on_channel = on_channel
        self._on_closed = on_closed
        self._qlog = qlog
        self._is_client = bool(quic.configuration.is_client)
        self._verified: asyncio.Future[None] = self._loop.create_future()
        self._peer_ok = False
        self.peer_party: str | None = None
        self.peer_addr = "?"
        self.failure: PeerUnavailableError | None = None
        self.terminated = False
        self._channels: dict[int, QuicByteChannel] = {}
        self._unaccepted: list[QuicByteChannel] = []
        self._transmit_pending = False
        self._due = 0.0  # the deadline of the timer that fired last: anything due by then is sent
        self._writers: list[asyncio.Future[None]] = []
        self._keepalive: asyncio.TimerHandle | None = None
        if identity is not None and not self._is_client:
            self._request_client_certificate(quic)

    @staticmethod
    def _request_client_certificate(quic: QuicConnection) -> None:
        # aioquic 1.7.2 asks for a client certificate only when this TLS flag is set; its TLS context
        # is created on the first datagram, so the flag is set right after that.
        original = quic._initialize

        def initialize(peer_cid: bytes) -> None:
            original(peer_cid)
            quic.tls._request_client_certificate = True

        setattr(quic, "_initialize", initialize)  # noqa: B010 (instance-level hook, see above)

    @property
    def description(self) -> str:
        who = f" party {self.peer_party}" if self.peer_party else ""
        return f"quic {self.peer_addr}{who}"

    # -- transmit batching ------------------------------------------------------------------------

    def transmit(self) -> None:
        """Schedule one transmit for this loop iteration (aioquic calls this after every input)."""
        if not self._transmit_pending:
            self._transmit_pending = True
            self._loop.call_soon(self._transmit_now)

    def _handle_timer(self) -> None:
        """The timer fired: what was due at its deadline is handled and sent now.

        Event-loop timers have ~1 ms granularity and may fire before their deadline. aioquic hands
        ``handle_timer`` the deadline in that case; the transmit that follows must use it too, or an
        ACK due 0.4 ms from now is not sent, the timer is re-armed for the same deadline, fires
        again at once, and the loop spins until the clock catches up (three wake-ups per received
        datagram were measured on a receiver at 100 Mbit/s). The deadline counts as passed
        (``K_PAST``): aioquic sends a due ACK without asking the pacer only when ``ack_at < now``.
        """
        self._due = max(self._timer_at or 0.0, _clock()) + K_PAST
        self._timer = None
        self._timer_at = None
        self._quic.handle_timer(now=self._due)
        self._process_events()
        self.transmit()

    def _transmit_now(self) -> None:
        self._transmit_pending = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        quic = self._quic
        datagrams = quic.datagrams_to_send(now=max(_clock(), self._due))
        if datagrams:
            self._send_datagrams(transport, datagrams)
        # re-arm the one timer (as aioquic's transmit does)
        timer_at = quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_later(timer_at - _clock(), self._handle_timer)
        self._timer_at = timer_at
        if not self._verified.done():
            self._check_ready()
        cc = self.cc
        if (
            quic._pacing_at is None
            and cc.bytes_in_flight + 2 * self._config.max_datagram_size <= cc.congestion_window
        ):
            cc.controller.on_app_limited(now=_clock())
        if self._writers:
            writers, self._writers = self._writers, []
            for fut in writers:
                if not fut.done():
                    fut.set_result(None)

    def _send_datagrams(self, transport: asyncio.DatagramTransport, datagrams: list[tuple[bytes, Any]]) -> None:
        """Send with UDP GSO where possible: runs of equal-size datagrams to one address, one syscall."""
        sock = self._gso_sock
        queued: Callable[[], int] = getattr(transport, "get_write_buffer_size", lambda: 0)
        if sock is None or queued():
            for data, addr in datagrams:
                transport.sendto(data, addr)
            return
        n = len(datagrams)
        i = 0
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            limit = min(K_GSO_MAX_SEGMENTS, K_GSO_MAX_BYTES // size)
            j = i + 1
            while j < n and j - i < limit and datagrams[j][1] == addr:
                other = len(datagrams[j][0])
                if other > size:
                    break
                j += 1
                if other < size:
                    break  # a shorter datagram may only end a GSO run
            try:
                if j - i == 1:
                    sock.sendto(data, addr)
                else:
                    payload = b"".join(d for d, _ in datagrams[i:j])
                    sock.sendmsg([payload], [(socket.SOL_UDP, K_UDP_SEGMENT, struct.pack("=H", size))], 0, addr)
            except BlockingIOError:
                break  # the kernel buffer is full: the transport queues the rest and waits
            except OSError as exc:
                if j - i > 1 and exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    log.info("%s: UDP GSO unavailable (%s); sending one datagram per call", self.description, exc)
                    self._gso_sock = None
                break
            i = j
        for data, addr in datagrams[i:]:
            transport.sendto(data, addr)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_addr = f"{peer[0]}:{peer[1]}"
        self._arm_keepalive()

    def connect(self, addr: Any, transmit: bool = True) -> None:
        self.peer_addr = f"{addr[0]}:{addr[1]}"
        self._quic.connect(addr, now=_clock())
        if transmit:
            self.transmit()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.peer_addr == "?":
            self.peer_addr = f"{addr[0]}:{addr[1]}"
        self._quic.receive_datagram(cast(bytes, data), addr, now=_clock())
        self._process_events()
        self.transmit()

    def _arm_keepalive(self) -> None:
        self._keepalive = self._loop.call_later(self._config.keepalive_s, self._keepalive_fire)

    def _keepalive_fire(self) -> None:
        if self.failure is not None:
            return
        self._quic.send_ping(0)
        self.transmit()
        self._arm_keepalive()

    # -- events -----------------------------------------------------------------------------------

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._on_stream_data(event)
        elif isinstance(event, events.HandshakeCompleted):
            self._on_handshake()
        elif isinstance(event, events.StreamReset):
            channel = self._channels.get(event.stream_id)
            if channel is not None:
                channel._fail(PeerUnavailableError(f"{self.description}: peer reset stream {event.stream_id}"))
        elif isinstance(event, events.ConnectionTerminated):
            self._on_terminated(event)

    def _on_handshake(self) -> None:
        if self._identity is not None:
            tls = self._quic.tls
            try:
                self.peer_party = verify_peer(
                    tls._peer_certificate,
                    list(tls._peer_certificate_chain),
                    ca_file=self._identity.ca_file,
                    expected_party=self._expected,
                    peer=f"quic {self.peer_addr}",
                )
            except PeerUnavailableError as exc:
                log.warning("%s", exc)
                self.failure = exc
                self._quic.close(error_code=K_IDENTITY_REJECTED, reason_phrase=str(exc)[:200])
                self.transmit()
                if not self._verified.done():
                    self._verified.set_exception(exc)
                    self._verified.exception()  # mark retrieved: a server has nobody waiting
                return
        if self._qlog is not None:
            self._qlog.label(self._quic._quic_logger, self._trace_names())
        self._peer_ok = True
        self._check_ready()
        pending, self._unaccepted = self._unaccepted, []
        for channel in pending:
            self._accept(channel)

    def _check_ready(self) -> None:
        # A client is ready once it verified the server AND the server confirmed the handshake
        # (HANDSHAKE_DONE), i.e. the server accepted our certificate; a rejection arrives instead as
        # CONNECTION_CLOSE and fails connect() with the server's reason.
        if self._verified.done() or not self._peer_ok:
            return
        if not self._is_client or self._quic._handshake_confirmed:
            self._verified.set_result(None)

    def _trace_names(self) -> list[str]:
        host = self.peer_addr.rpartition(":")[0]
        names = [self.peer_party] if self.peer_party else []
        return [*names, self.peer_addr, host]

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        sid = event.stream_id
        channel = self._channels.get(sid)
        if channel is None:
            if self._is_local(sid) or self.failure is not None:
                return  # a stream of ours that we already forgot, or a rejected peer
            channel = QuicByteChannel(self, sid)
            self._channels[sid] = channel
            if self._verified.done() and self.failure is None:
                self._accept(channel)
            else:
                self._unaccepted.append(channel)
        channel._feed(event.data, event.end_stream)

    def _accept(self, channel: QuicByteChannel) -> None:
        if self._on_channel is None:
            channel._fail(PeerUnavailableError(f"{self.description}: peer-opened streams are not accepted"))
            return
        self._on_channel(channel)

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        self.terminated = True
        if self.failure is None:
            reason = event.reason_phrase or f"error 0x{event.error_code:x}"
            self.failure = PeerUnavailableError(f"{self.description}: connection closed: {reason}")
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self._verified.done():
            self._verified.set_exception(self.failure)
            self._verified.exception()  # mark retrieved: nobody may be waiting
        for channel in list(self._channels.values()):
            channel._fail(self.failure)
        for fut in self._writers:
            if not fut.done():
                fut.set_result(None)
        self._writers.clear()
        if self._on_closed is not None:
            self._on_closed(self)
        if self._is_client and self._transport is not None:
            self._transport.close()

    # -- used by channels and the carrier ---------------------------------------------------------

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id & 1) == (0 if self._is_client else 1)

    async def wait_verified(self) -> None:
        await asyncio.shield(self._verified)

    def open_channel(self) -> QuicByteChannel:
        if self.failure is not None:
            raise PeerUnavailableError(str(self.failure))
        sid = self._quic.get_next_available_stream_id()
        # aioquic only reserves the id once the stream exists: create it now (no frame is sent for
        # an empty write), or the next open_channel() would get the same id.
        self._quic.send_stream_data(sid, b"")
        channel = QuicByteChannel(self, sid)
        self._channels[sid] = channel
        return channel

    def buffered(self, stream_id: int) -> int:
        stream = self._quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    async def wait_writable(self, stream_id: int) -> None:
        while True:
            if self.failure is not None:
                raise PeerUnavailableError(str(self.failure))
            if self.buffered(stream_id) < self._config.send_buffer_bytes:
                return
            fut: asyncio.Future[None] = self._loop.create_future()
            self._writers.append(fut)
            await fut

    def send_stream(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        # a chunked send buffer instead of aioquic's bytearray (see _quic_buffer)
        adopt(self._quic._get_or_create_stream_for_send(stream_id).sender)
        self._quic.send_stream_data(stream_id, data, end_stream=end)
        self.transmit()

    def forget(self, stream_id: int) -> None:
        self._channels.pop(stream_id, None)

    def close_now(self, reason: str = "closing") -> None:
        """Close the connection and send CONNECTION_CLOSE at once (the transport may close next)."""
        if self.failure is None:
            self.failure = PeerUnavailableError(f"{self.description}: closed locally: {reason}")
        self._quic.close(error_code=K_CLOSED_BY_US, reason_phrase=reason)
        self._transmit_pending = False
        self._transmit_now()

    def statistics(self) -> CongestionStatistics:
        return self.cc.controller.statistics()


class QuicByteChannel:
    """One bidirectional QUIC stream as a :class:`fedgate.proxy.carrier.ByteChannel`."""

    def __init__(self, protocol: _LinkProtocol, stream_id: int) -> None:
        self._protocol = protocol
        self._sid = stream_id
        self._rx: deque[bytes] = deque()
        self._rx_eof = False
        self._rx_waiter: asyncio.Future[None] | None = None
        self._error: PeerUnavailableError | None = None
        self._closed = False
        self._send_lock = asyncio.Lock()

    @property
    def peer_party(self) -> str | None:
        return self._protocol.peer_party

    @property
    def description(self) -> str:
        return f"{self._protocol.description} stream {self._sid}"

    def statistics(self) -> CongestionStatistics:
        """The connection's congestion-controller snapshot."""
        return self._protocol.statistics()

    async def send(self, data: bytes | memoryview) -> None:
        if self._closed:
            raise LocalError(f"{self.description}: send after aclose")
        view = memoryview(data).cast("B")
        async with self._send_lock:
            for offset in range(0, len(view), K_CHUNK):
                await self._protocol.wait_writable(self._sid)
                self._protocol.send_stream(self._sid, bytes(view[offset : offset + K_CHUNK]))

    async def receive(self) -> bytes:
        while True:
            if self._rx:
                if len(self._rx) == 1:
                    return self._rx.popleft()
                data = b"".join(self._rx)
                self._rx.clear()
                return data
            if self._rx_eof:
                return b""
            if self._error is not None:
                raise PeerUnavailableError(str(self._error))
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._rx_waiter = fut
            try:
                await fut
            finally:
                self._rx_waiter = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._protocol.failure is None:
            with contextlib.suppress(Exception):
                self._protocol.send_stream(self._sid, b"", end=True)
        if self._rx_eof or self._protocol.failure is not None:
            self._protocol.forget(self._sid)

    def _feed(self, data: bytes, end: bool) -> None:
        if data:
            self._rx.append(data)
        if end:
            self._rx_eof = True
            if self._closed:
                self._protocol.forget(self._sid)
        self._wake()

    def _fail(self, error: PeerUnavailableError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        fut = self._rx_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)
