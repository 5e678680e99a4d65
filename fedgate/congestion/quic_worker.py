"""A QUIC worker process: the QUIC endpoints of a gateway, one core's worth, bridged over Unix sockets.

Started by :class:`fedgate.congestion.quic_workers.QuicWorkerCarrier` as
``python -m fedgate.congestion.quic_worker`` with its settings as one JSON line on stdin.

Rules of this module:

1. The worker runs an ordinary in-process :class:`~fedgate.congestion.quic_link.QuicCarrier` and
   bridges its channels to the gateway (:mod:`~fedgate.congestion._bridge`): the gateway asks for
   outbound channels on the worker's Unix socket (``connect``) and hands it listening UDP sockets
   (``listen``, the socket passed with SCM_RIGHTS); each inbound channel is offered to the gateway
   on the gateway's Unix socket (``accept``).
2. It lives as long as its stdin: the gateway holds the other end, so a gateway that dies, however
   it dies, takes its workers with it. SIGTERM closes the QUIC connections, then exits.
3. The worker's connection ids start with its index (:mod:`~fedgate.congestion._steering`), so the
   kernel steers a connection's packets to it even when the peer's address changes.
4. It logs to stderr, which the gateway's journal receives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pathlib
import signal
import socket
import ssl
import sys
import threading
from typing import Any

from fedgate.config import LogConfig
from fedgate.configtree import build
from fedgate.congestion._bridge import (
    K_FRAME_DATA,
    K_MAX_LINE,
    K_READ,
    K_STATS_EVERY,
    KIND_DATA,
    KIND_END,
    KIND_ERROR,
    frame,
    statistics_frame,
    write_line,
)
from fedgate.congestion._quic_tls import QuicIdentity
from fedgate.congestion.config import QuicConfig
from fedgate.congestion.quic_link import QuicByteChannel, QuicCarrier, QuicCarrierServer
from fedgate.errors import FedgateError, LocalError, PeerUnavailableError
from fedgate.logs import setup_logging

__all__ = ["main"]

log = logging.getLogger("fedgate.congestion.quic_worker")

K_CLOSE_TIMEOUT = 3.0  # seconds a stopping worker waits for its connections to close
K_REQUEST_TIMEOUT = 10.0  # seconds the gateway has to send a request line


class _Worker:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.index = int(settings["index"])
        self.name = f"quic worker {self.index}"
        self.config = build(QuicConfig, settings.get("quic", {}), path="quic")
        ident = settings.get("identity")
        self.identity = None if ident is None else QuicIdentity(
            pathlib.Path(ident["ca_file"]), pathlib.Path(ident["cert_file"]), pathlib.Path(ident["key_file"])
        )
        self.socket_path = str(settings["socket"])
        self.gateway_path = str(settings["gateway"])
        self.carrier = QuicCarrier(self.config, identity=self.identity)
        self.servers: list[QuicCarrierServer] = []
        self.tasks: set[asyncio.Task[None]] = set()
        # QuicCarrier's ``tls`` only says "mutual TLS" (it uses the identity, not the context).
        self.secure_marker = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- requests from the gateway -----------------------------------------------------------------

    async def on_request(
        self, request: dict[str, Any], fds: list[int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            op = request.get("op")
            if op == "connect":
                await self._connect(request, reader, writer)
            elif op == "listen" and len(fds) == 1:
                await self._listen(request, fds.pop(), writer)
            else:
                raise LocalError(f"{self.name}: unknown request {op!r} with {len(fds)} sockets")
        except (FedgateError, OSError, ValueError, KeyError, TypeError) as exc:
            with contextlib.suppress(ConnectionError, OSError):
                write_line(writer, {"ok": False, "error": str(exc)})
                await writer.drain()
        finally:
            for fd in fds:
                socket.close(fd)
            writer.close()

    async def _connect(self, request: dict[str, Any], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        host, port = str(request["host"]), int(request["port"])
        secure = bool(request["secure"])
        party = request.get("party")
        channel = await self.carrier.connect(
            host, port, tls=self.secure_marker if secure else None,
            server_hostname=None if party is None else str(party), timeout=float(request["timeout"]),
            lane=int(request.get("lane", 0)),
        )
        write_line(writer, {"ok": True, "peer_party": channel.peer_party, "description": channel.description})
        await writer.drain()
        await splice(channel, reader, writer)

    async def _listen(self, request: dict[str, Any], fd: int, writer: asyncio.StreamWriter) -> None:
        sock = socket.socket(fileno=fd)
        listener = str(request["listener"])
        secure = bool(request["secure"])

        async def offer(channel: QuicByteChannel) -> None:
            await self._offer(listener, channel)

        server = await self.carrier.listen_on(
            sock, tls=self.secure_marker if secure else None, handler=offer,  # type: ignore[arg-type]
            cid_prefix=self.index,
        )
        self.servers.append(server)
        write_line(writer, {"ok": True})
        await writer.drain()

    async def _offer(self, listener: str, channel: QuicByteChannel) -> None:
        """An inbound channel: hand it to the gateway on its socket, then bridge it."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.gateway_path, limit=K_MAX_LINE)
        except OSError as exc:
            raise PeerUnavailableError(f"{self.name}: the gateway is not listening: {exc}") from exc
        try:
            write_line(writer, {"op": "accept", "listener": listener, "peer_party": channel.peer_party,
                                "description": channel.description})
            await writer.drain()
            await splice(channel, reader, writer)
        finally:
            writer.close()

    async def aclose(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.aclose()
        with contextlib.suppress(Exception):
            await self.carrier.aclose()


async def splice(channel: QuicByteChannel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bridge one QUIC channel and one Unix stream (see :mod:`~fedgate.congestion._bridge`) until both end."""

    async def outward() -> None:  # gateway -> QUIC
        while True:
            data = await reader.read(K_READ)
            if not data:
                await channel.aclose()
                return
            await channel.send(data)

    async def inward() -> None:  # QUIC -> gateway
        try:
            while True:
                data = await channel.receive()
                if not data:
                    writer.write(frame(KIND_END))
                    await writer.drain()
                    return
                view = memoryview(data)
                for start in range(0, len(view), K_FRAME_DATA):  # a receive may join many MB
                    writer.write(frame(KIND_DATA, bytes(view[start : start + K_FRAME_DATA])))
                await writer.drain()
        except PeerUnavailableError as exc:
            writer.write(frame(KIND_ERROR, str(exc).encode()))
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()

    async def report() -> None:  # the controller's snapshot, for the gateway's metrics
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            while not writer.is_closing():
                writer.write(statistics_frame(channel.statistics()))
                await asyncio.sleep(K_STATS_EVERY)

    reporter = asyncio.ensure_future(report())
    tasks = [asyncio.ensure_future(outward()), asyncio.ensure_future(inward())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None and not isinstance(task.exception(), ConnectionError | OSError):
                if isinstance(task.exception(), PeerUnavailableError):
                    with contextlib.suppress(ConnectionError, OSError):
                        writer.write(frame(KIND_ERROR, str(task.exception()).encode()))
                        await writer.drain()
                else:
                    log.error("%s: bridge failed", channel.description, exc_info=task.exception())
    finally:
        reporter.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(reporter, *tasks, return_exceptions=True)
        await channel.aclose()


async def _serve(worker: _Worker) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(worker.socket_path)
    listener.listen(64)
    listener.setblocking(False)

    async def accept_loop() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            worker._spawn(_handle(conn))

    async def _handle(conn: socket.socket) -> None:
        # A request may carry a socket (listen, SCM_RIGHTS), which asyncio's streams cannot receive:
        # the request line is read with recv_fds before the connection becomes a stream.
        try:
            request, fds = await loop.run_in_executor(None, _recv_request, conn)
        except (OSError, ValueError) as exc:
            log.warning("%s: bad request from the gateway: %s", worker.name, exc)
            conn.close()
            return
        conn.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=conn, limit=K_MAX_LINE)
        await worker.on_request(request, fds, reader, writer)

    def watch_stdin() -> None:
        # A daemon thread, so a blocked read does not hold up the exit. It reads the raw descriptor:
        # a daemon thread blocked in sys.stdin.buffer holds that buffer's lock, and the interpreter,
        # closing stdin at exit, then aborts ("Fatal Python error: _enter_buffered_busy").
        fd = sys.stdin.fileno()
        with contextlib.suppress(OSError):
            while os.read(fd, 4096):
                pass
        with contextlib.suppress(RuntimeError):  # the loop may be closed already (we stopped on SIGTERM)
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    accepting = loop.create_task(accept_loop())
    await stop.wait()
    accepting.cancel()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(worker.aclose(), K_CLOSE_TIMEOUT)
    listener.close()


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The request line (and its socket, if any). The gateway sends nothing more until it is answered."""
    conn.settimeout(K_REQUEST_TIMEOUT)
    data, fds, _flags, _addr = socket.recv_fds(conn, K_MAX_LINE, 1)
    try:
        while not data.endswith(b"\n"):
            more = conn.recv(K_MAX_LINE)
            if not more or len(data) + len(more) > K_MAX_LINE:
                raise ValueError("the request is not one line of at most 64 KiB")
            data += more
        request = json.loads(data)
        if not isinstance(request, dict):
            raise ValueError("the request is not a JSON object")
    except BaseException:
        for fd in fds:
            socket.close(fd)
        raise
    return request, fds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedgate.congestion.quic_worker")
    parser.parse_args(argv)
    line = sys.stdin.buffer.readline(K_MAX_LINE)
    try:
        settings = json.loads(line)
        setup_logging(build(LogConfig, settings.get("log", {}), path="log"))  # the gateway's level and format
        worker = _Worker(settings)
    except (ValueError, KeyError, TypeError, AttributeError, FedgateError) as exc:
        print(f"quic worker: bad settings on stdin: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
