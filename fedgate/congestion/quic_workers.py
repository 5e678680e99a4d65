"""The ``quic`` carrier with its QUIC endpoints in worker processes (``[quic] workers = N``).

aioquic is pure Python: one core carries about 100 Mbit/s of QUIC at each end of a link (see the
package README). With ``workers = N`` the gateway keeps its store, fronts and link protocol, and N
worker processes (:mod:`fedgate.congestion.quic_worker`) run the QUIC connections; with
``link.lanes_per_peer`` > 1 one peer's lanes spread over them.

Rules of this module:

1. Workers start with the first ``connect`` or ``listen`` and stop with :meth:`aclose`. A worker
   that exits while the carrier runs is restarted (after ``K_RESTART_DELAY``) and given back its
   listening sockets; the channels it carried fail with "quic worker N exited", and the link
   protocol reconnects and resends, so nothing is lost.
2. Outbound: lane ``k`` of a peer uses worker ``k % N`` (so lanes land on different workers).
3. Inbound: ``listen`` binds N UDP sockets to the one port with SO_REUSEPORT, steered by connection
   id (:mod:`fedgate.congestion._steering`): each worker serves one socket and a peer's packets reach
   the worker that holds its connection, across migrations too. The gateway keeps the sockets.
4. Each worker has the gateway's ``[quic]`` settings and TLS identity, and authenticates peers
   itself; the peer party it proved travels with each bridged channel.
5. The Unix sockets live in a private directory (mode 0700) that :meth:`aclose` removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import ssl
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from fedgate.configtree import dump
from fedgate.congestion._bridge import K_MAX_LINE, BridgeChannel, read_line, write_line
from fedgate.congestion._quic_tls import QuicIdentity
from fedgate.congestion._steering import reuseport_group
from fedgate.congestion.config import QuicConfig
from fedgate.errors import ConfigError, FedgateError, LocalError, PeerUnavailableError
from fedgate.logs import JsonFormatter
from fedgate.proxy.carrier import ChannelHandler

__all__ = ["QuicWorkerCarrier"]

log = logging.getLogger("fedgate.congestion.quic_workers")

K_START_TIMEOUT = 20.0  # seconds a worker has to open its socket
K_STOP_TIMEOUT = 5.0  # seconds a worker has to exit after SIGTERM before it is killed
K_RESTART_DELAY = 0.5  # seconds before a worker that exited is started again


@dataclass
class _Worker:
    index: int
    socket_path: str
    process: asyncio.subprocess.Process | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return f"quic worker {self.index}"


@dataclass
class _Listening:
    listener: str
    sockets: list[socket.socket]
    secure: bool
    handler: ChannelHandler


class QuicWorkerServer:
    """The listening side: N steered sockets, one per worker.

    ``aclose`` stops handing inbound channels to the handler; the workers' sockets close when the
    carrier stops them (:meth:`QuicWorkerCarrier.aclose`).
    """

    def __init__(self, carrier: QuicWorkerCarrier, listening: _Listening) -> None:
        self._carrier = carrier
        self._listening = listening

    @property
    def port(self) -> int:
        return int(self._listening.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        await self._carrier._unlisten(self._listening)


class QuicWorkerCarrier:
    """The ``quic`` carrier whose connections run in ``config.workers`` processes (see the module rules)."""

    def __init__(self, config: QuicConfig, *, identity: QuicIdentity | None = None) -> None:
        if config.workers < 1:
            raise ConfigError("QuicWorkerCarrier needs quic.workers >= 1", path="quic.workers")
        self.config = config
        self._identity = identity
        self._dir: str | None = None
        self._workers: list[_Worker] = []
        self._listening: dict[str, _Listening] = {}
        self._gateway_server: asyncio.AbstractServer | None = None
        self._supervisors: set[asyncio.Task[None]] = set()
        self._channels: set[asyncio.Task[None]] = set()
        self._start_lock = asyncio.Lock()
        self._closing = False
        self._next_listener = 0
        self.restarts = 0
        """Worker processes that exited while the carrier ran (each was restarted)."""

    @property
    def name(self) -> str:
        return "quic"

    @property
    def worker_pids(self) -> list[int | None]:
        """The worker processes' pids (None while one is being restarted)."""
        return [None if w.process is None or w.process.returncode is not None else w.process.pid
                for w in self._workers]

    # -- the Carrier protocol ---------------------------------------------------------------------

    async def connect(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None, timeout: float,
        lane: int = 0,
    ) -> BridgeChannel:
        self._check_tls(tls)
        await self._start()
        worker = self._workers[lane % len(self._workers)]
        where = f"quic {host}:{port}"
        try:
            async with asyncio.timeout(timeout + 1.0):
                await worker.started.wait()
                reader, writer = await asyncio.open_unix_connection(worker.socket_path, limit=K_MAX_LINE)
        except (TimeoutError, OSError) as exc:
            raise PeerUnavailableError(f"{where}: {worker.name} is not running: {exc or 'timed out'}") from exc
        try:
            write_line(writer, {"op": "connect", "host": host, "port": port, "secure": tls is not None,
                                "party": server_hostname, "timeout": timeout, "lane": lane})
            await writer.drain()
            async with asyncio.timeout(timeout + 1.0):
                answer = await read_line(reader, what=worker.name)
        except (TimeoutError, OSError, LocalError) as exc:
            writer.close()
            raise PeerUnavailableError(f"{where}: {worker.name}: {exc or 'no answer'}") from exc
        if not answer.get("ok"):
            writer.close()
            raise PeerUnavailableError(str(answer.get("error") or f"{where}: {worker.name} refused"))
        return _channel(reader, writer, answer, worker)

    async def listen(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, handler: ChannelHandler
    ) -> QuicWorkerServer:
        self._check_tls(tls)
        try:
            sockets = reuseport_group(host, port, self.config.workers)
        except OSError as exc:
            raise PeerUnavailableError(f"quic {host}:{port}: cannot listen: {exc}") from exc
        await self._start()
        self._next_listener += 1
        listening = _Listening(f"l{self._next_listener}", sockets, tls is not None, handler)
        self._listening[listening.listener] = listening
        try:
            for worker in self._workers:
                await self._hand_socket(worker, listening)
        except (FedgateError, OSError) as exc:
            await self._unlisten(listening)
            raise PeerUnavailableError(f"quic {host}:{port}: cannot listen: {exc}") from exc
        return QuicWorkerServer(self, listening)

    async def aclose(self) -> None:
        """Stop the workers (SIGTERM: they close their connections), then remove their sockets."""
        self._closing = True
        for task in list(self._supervisors):
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        await asyncio.gather(*(self._stop(w) for w in self._workers), return_exceptions=True)
        for task in list(self._channels):
            task.cancel()
        await asyncio.gather(*self._channels, return_exceptions=True)
        if self._gateway_server is not None:
            self._gateway_server.close()
        for listening in list(self._listening.values()):
            for sock in listening.sockets:
                sock.close()
        self._listening.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- workers ------------------------------------------------------------------------------------

    def _check_tls(self, tls: ssl.SSLContext | None) -> None:
        if tls is not None and self._identity is None:
            raise ConfigError("mutual TLS was requested but the QUIC carrier has no identity", path="tls")

    async def _start(self) -> None:
        async with self._start_lock:
            if self._workers or self._closing:
                if self._closing:
                    raise PeerUnavailableError("the QUIC carrier is closing")
                return
            self._dir = tempfile.mkdtemp(prefix="fedgate-quic-")
            os.chmod(self._dir, 0o700)
            gateway_path = os.path.join(self._dir, "gateway.sock")
            self._gateway_server = await asyncio.start_unix_server(self._on_accept, gateway_path, limit=K_MAX_LINE)
            self._workers = [_Worker(i, os.path.join(self._dir, f"worker-{i}.sock"))
                             for i in range(self.config.workers)]
            for worker in self._workers:
                task = asyncio.get_running_loop().create_task(self._supervise(worker), name=worker.name)
                self._supervisors.add(task)
                task.add_done_callback(self._supervisors.discard)
            async with asyncio.timeout(K_START_TIMEOUT):
                for worker in self._workers:
                    await worker.started.wait()

    def _settings(self, worker: _Worker) -> bytes:
        identity = None
        if self._identity is not None:
            identity = {"ca_file": str(self._identity.ca_file), "cert_file": str(self._identity.cert_file),
                        "key_file": str(self._identity.key_file)}
        assert self._dir is not None
        return json.dumps({
            "index": worker.index, "quic": dump(self.config), "identity": identity,
            "socket": worker.socket_path, "gateway": os.path.join(self._dir, "gateway.sock"),
            "log": _our_logging(),
        }).encode() + b"\n"

    async def _supervise(self, worker: _Worker) -> None:
        """Run the worker; restart it when it exits (rule 1) until the carrier closes."""
        while not self._closing:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(worker.socket_path)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedgate.congestion.quic_worker", stdin=asyncio.subprocess.PIPE,
            )
            worker.process = process
            assert process.stdin is not None
            process.stdin.write(self._settings(worker))  # stdin stays open: its EOF stops the worker
            try:
                await self._wait_socket(worker, process)
                for listening in list(self._listening.values()):
                    await self._hand_socket(worker, listening)
            except (FedgateError, OSError, TimeoutError) as exc:
                log.error("%s did not start: %s", worker.name, exc)
                process.kill()
            else:
                worker.started.set()
                log.info("%s running", worker.name, extra={"fields": {"pid": process.pid}})
            code = await process.wait()
            worker.started.clear()
            if self._closing:
                return
            self.restarts += 1
            log.error("%s exited with status %s; restarting it (its channels fail, links reconnect)",
                      worker.name, code)
            await asyncio.sleep(K_RESTART_DELAY)

    async def _wait_socket(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        async with asyncio.timeout(K_START_TIMEOUT):
            while not os.path.exists(worker.socket_path):
                if process.returncode is not None:
                    raise LocalError(f"{worker.name} exited with status {process.returncode} at start")
                await asyncio.sleep(0.02)

    async def _stop(self, worker: _Worker) -> None:
        process = worker.process
        if process is None or process.returncode is not None:
            return
        if process.stdin is not None:
            process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(K_STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            log.warning("%s did not stop within %g s; killing it", worker.name, K_STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def _hand_socket(self, worker: _Worker, listening: _Listening) -> None:
        """Give ``worker`` its socket of a listening group (SCM_RIGHTS); waits for its answer."""
        sock = listening.sockets[worker.index]
        request = json.dumps({"op": "listen", "listener": listening.listener, "secure": listening.secure})

        def hand() -> dict[str, Any]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(K_START_TIMEOUT)
                conn.connect(worker.socket_path)
                socket.send_fds(conn, [request.encode() + b"\n"], [sock.fileno()])
                answer = b""
                while not answer.endswith(b"\n"):
                    more = conn.recv(K_MAX_LINE)
                    if not more:
                        break
                    answer += more
            value = json.loads(answer) if answer else {}
            return value if isinstance(value, dict) else {}

        answer = await asyncio.get_running_loop().run_in_executor(None, hand)
        if not answer.get("ok"):
            raise LocalError(f"{worker.name}: {answer.get('error') or 'no answer to listen'}")

    async def _unlisten(self, listening: _Listening) -> None:
        # The workers hold their own copies of the sockets and serve them until they stop (aclose);
        # what they offer for a listener that is gone is refused here (_on_accept).
        if self._listening.pop(listening.listener, None) is None:
            return
        for sock in listening.sockets:
            sock.close()

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A worker offers an inbound channel (rule 3): hand it to its listener's handler."""
        try:
            offer = await read_line(reader, what="quic worker offer")
        except LocalError as exc:
            log.warning("%s", exc)
            writer.close()
            return
        listening = self._listening.get(str(offer.get("listener")))
        if offer.get("op") != "accept" or listening is None:
            writer.close()
            return
        channel = _channel(reader, writer, offer, None)
        task = asyncio.current_task()
        if task is not None:
            self._channels.add(task)
        try:
            await listening.handler(channel)
        except PeerUnavailableError as exc:
            log.info("%s: %s", channel.description, exc)
        except Exception:
            log.exception("%s: channel handler failed", channel.description)
        finally:
            if task is not None:
                self._channels.discard(task)
            await channel.aclose()


def _our_logging() -> dict[str, str]:
    """This process's log level and format, for a worker's ``[log]`` (a CLI without logging: warnings)."""
    root = logging.getLogger()
    level = root.getEffectiveLevel()
    name = "debug" if level <= logging.DEBUG else "info" if level <= logging.INFO else (
        "warning" if level <= logging.WARNING else "error")
    json_format = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return {"level": name, "format": "json" if json_format else "plain"}


def _channel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: dict[str, Any],
             worker: _Worker | None) -> BridgeChannel:
    party = info.get("peer_party")
    return BridgeChannel(
        reader, writer, peer_party=party if isinstance(party, str) else None,
        description=str(info.get("description") or "quic (worker)")[:200],
        worker=worker.name if worker is not None else "its quic worker",
    )
