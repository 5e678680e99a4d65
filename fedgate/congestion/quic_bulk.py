"""QUIC bulk transfer over fedgate's QUIC carrier, for the WAN benchmark (``fedgate bench wan``).

Usage (the transport-runner contract: each side prints ONE JSON line on stdout at the end)::

    python -m fedgate.congestion.quic_bulk serve --listen HOST:PORT
    python -m fedgate.congestion.quic_bulk send --connect HOST:PORT --duration S [--cc ltbbr|newreno]
    (both take --connections N)

Rules of this module:

1. Same measurement as ``fedgate.bench.tcp_bulk``: the window is the receiver's. It starts when the
   receiver accepts the stream (right after the handshake) and lasts the duration the sender announces
   in an 8-byte header (big-endian double, seconds); the receiver then closes the connection, which
   ends the sender. Goodput = stream bytes the receiver read inside the window / window.
2. The sender keeps sending past its deadline (until the receiver closes, or K_SEND_GRACE more
   seconds) so the pipe stays full; its controller statistics are sampled at its own deadline.
3. Insecure mode (self-signed, unverified TLS): this is a benchmark tool, not a link.
4. Receiver JSON: ``bytes``, ``seconds``. Sender JSON: ``bytes_sent`` (datagram bytes acknowledged),
   ``packets_sent``, ``packets_lost`` (declared lost by QUIC loss detection), plus ``cc``, ``state``,
   ``srtt_ms``, ``min_rtt_ms``, ``cwnd``, ``pacing_mbit``, ``bw_mbit``, ``congestion_events`` and
   ``stream_bytes`` (payload handed to QUIC), and on both sides ``cpu_s``/``cpu_share`` (this
   process's CPU time over the transfer: well below 1.0 while the host is 100% busy means the QUIC
   process was starved by other work, not limited by itself).
5. uvloop runs the event loop when it is installed.
7. ``$FEDGATE_QUIC_BULK_TRACE=FILE``: the sender appends its controller state (one JSON line every
   K_TRACE_EVERY seconds: state, cwnd, in flight, bandwidth model, acked bytes, CPU) for diagnosis.
6. ``--connections N`` (default K_DEFAULT_CONNECTIONS, or $FEDGATE_QUIC_BULK_CONNECTIONS): N QUIC
   connections, one process each, on both sides; the receiver binds N SO_REUSEPORT sockets before
   forking so the kernel keeps each connection on one process. The window starts at the first accept
   on any of them; bytes and packet counts are summed (``per_connection`` lists the parts). This is
   the "several connections per peer when one core is not enough" mode of the carrier.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import multiprocessing
import os
import queue
import signal
import socket
import struct
import sys
import time
from collections.abc import Coroutine, Sequence
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

from fedgate.congestion import CongestionStatistics, check_controller_name
from fedgate.congestion.config import QuicConfig
from fedgate.congestion.quic_link import QuicByteChannel, QuicCarrier
from fedgate.errors import ConfigError, FedgateError, PeerUnavailableError
from fedgate.proxy.carrier import ByteChannel

__all__ = ["main"]

K_HEADER = struct.Struct("!d")  # the announced duration, seconds
K_CHUNK = 1 << 20  # bytes per send call
K_SEND_GRACE = 10.0  # seconds the sender goes on past its deadline waiting for the receiver to close
K_ACCEPT_TIMEOUT = 60.0  # seconds the receiver waits for a connection
K_CONNECT_TIMEOUT = 10.0  # seconds the sender retries the handshake
K_MIB = 1 << 20  # bytes
K_POLL = 0.02  # seconds between checks of the shared window by an idle receiver worker
K_WORKER_TIMEOUT = K_ACCEPT_TIMEOUT + 30.0  # seconds to wait for a worker's result
K_DEFAULT_CONNECTIONS = 1  # connections (processes) per side: one free core carries ~150-250 Mbit/s
K_CONNECTIONS_ENV = "FEDGATE_QUIC_BULK_CONNECTIONS"  # overrides K_DEFAULT_CONNECTIONS (harness runs pass no flags)
K_CONN_HELP = f"QUIC connections, one process each (default {K_DEFAULT_CONNECTIONS}, or ${K_CONNECTIONS_ENV})"
K_TRACE_ENV = "FEDGATE_QUIC_BULK_TRACE"  # a file: the sender appends one JSON line per K_TRACE_EVERY
K_TRACE_EVERY = 0.25  # seconds between trace lines
K_BULK_CONFIG = {
    "max_data_bytes": 256 * K_MIB,
    "max_stream_data_bytes": 256 * K_MIB,
    "send_buffer_bytes": 32 * K_MIB,
    "idle_timeout_s": 20.0,
}


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def _config(cc: str) -> QuicConfig:
    return QuicConfig(congestion_control=cc, **K_BULK_CONFIG)  # type: ignore[arg-type]


class _Window:
    """The receiver's measurement window, shared by the worker processes (CLOCK_MONOTONIC is system-wide)."""

    def __init__(self, ctx: BaseContext) -> None:
        self._t0 = ctx.Value("d", 0.0)
        self._duration = ctx.Value("d", 0.0)

    def start(self, now: float) -> None:
        with self._t0.get_lock():
            if self._t0.value == 0.0:
                self._t0.value = now

    def set_duration(self, duration: float) -> None:
        with self._duration.get_lock():
            if self._duration.value == 0.0:
                self._duration.value = max(duration, 1e-3)

    @property
    def t0(self) -> float:
        return float(self._t0.value)

    def deadline(self) -> float | None:
        t0, duration = self._t0.value, self._duration.value
        return float(t0 + duration) if t0 and duration else None


async def _serve_one(sock: socket.socket, window: _Window, accept_timeout: float) -> dict[str, Any]:
    """Serve every stream arriving on ``sock``; count bytes inside the shared window."""
    carrier = QuicCarrier(_config(QuicConfig().congestion_control))
    total = 0
    errors: list[str] = []
    streams = 0

    async def handler(channel: ByteChannel) -> None:
        nonlocal total, streams
        window.start(time.monotonic())
        streams += 1
        head: bytes | None = b""
        while True:
            deadline = window.deadline()
            remaining = (deadline - time.monotonic()) if deadline is not None else K_ACCEPT_TIMEOUT
            if remaining <= 0:
                break
            try:
                data = await asyncio.wait_for(channel.receive(), remaining)
            except TimeoutError:
                continue
            except PeerUnavailableError as exc:
                errors.append(str(exc))
                break
            if not data:
                errors.append("sender closed early")
                break
            if head is not None:
                head += data
                if len(head) < K_HEADER.size:
                    continue
                window.set_duration(K_HEADER.unpack_from(head)[0])
                total += len(head) - K_HEADER.size
                head = None
            else:
                total += len(data)

    server = await carrier.listen_on(sock, tls=None, handler=handler)
    cpu0, wall0 = time.process_time(), time.monotonic()
    give_up = time.monotonic() + accept_timeout
    try:
        while True:
            deadline = window.deadline()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if window.t0 == 0.0 and now > give_up:
                break
            await asyncio.sleep(K_POLL)
    finally:
        await server.aclose()
    deadline = window.deadline()
    seconds = (min(time.monotonic(), deadline) - window.t0) if deadline is not None else 0.0
    out: dict[str, Any] = {"bytes": total, "seconds": seconds, "streams": streams, **_cpu(cpu0, wall0)}
    if errors:
        out["error"] = errors[0]
    return out


def _reuseport_sockets(listen: str, count: int) -> list[socket.socket]:
    host, port = _split(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        socks.append(sock)
    return socks


def serve(listen: str, *, accept_timeout: float = K_ACCEPT_TIMEOUT, connections: int = 1) -> dict[str, Any]:
    """Receive for the announced window on ``connections`` processes (SO_REUSEPORT); receiver JSON.

    Every socket of the reuse-port group is bound before the first worker starts, so the kernel's
    spreading of connections over the sockets never changes under a running connection.
    """
    ctx = multiprocessing.get_context("fork")
    window = _Window(ctx)
    socks = _reuseport_sockets(listen, connections)
    results: Queue[dict[str, Any]] = ctx.Queue()
    workers = []
    for sock in socks[1:]:
        proc = ctx.Process(target=_serve_worker, args=(sock, window, accept_timeout, results), daemon=True)
        proc.start()
        sock.close()
        workers.append(proc)
    outs = [_run(_serve_one(socks[0], window, accept_timeout))]
    outs += _collect(results, workers)
    return _merge_receivers(outs)


def _serve_worker(sock: socket.socket, window: _Window, accept_timeout: float, results: Queue[dict[str, Any]]) -> None:
    _die_with_parent()
    results.put(_run(_serve_one(sock, window, accept_timeout)))


def _merge_receivers(outs: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "bytes": sum(int(o.get("bytes", 0)) for o in outs),
        "seconds": max(float(o.get("seconds", 0.0)) for o in outs),
        "connections": len(outs),
        "per_connection": [o.get("bytes", 0) for o in outs],
        "cpu_s": round(sum(float(o.get("cpu_s", 0.0)) for o in outs), 3),
        "cpu_share": max(float(o.get("cpu_share", 0.0)) for o in outs),
    }
    served = [o for o in outs if o.get("streams")]
    errors = [o["error"] for o in served if "error" in o]
    if not served:
        merged["error"] = "no connection"
    elif errors:
        merged["error"] = errors[0]
    return merged


def _die_with_parent() -> None:
    """A worker must not outlive the process the harness signals (PR_SET_PDEATHSIG = SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def _collect(results: Queue[dict[str, Any]], workers: Sequence[BaseProcess]) -> list[dict[str, Any]]:
    outs = []
    for _ in workers:
        try:
            outs.append(results.get(timeout=K_WORKER_TIMEOUT))
        except queue.Empty:
            outs.append({"bytes": 0, "seconds": 0.0, "error": "worker gave no result"})
    for proc in workers:
        proc.join(timeout=1.0)
        if proc.is_alive():
            proc.kill()
    return outs


def _cpu(cpu0: float, wall0: float) -> dict[str, float]:
    """This process's CPU seconds and its share of the wall time since (cpu0, wall0)."""
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {"cpu_s": round(cpu, 3), "cpu_share": round(cpu / wall, 3) if wall > 0 else 0.0}


def _stats_json(stats: CongestionStatistics) -> dict[str, Any]:
    return {
        "bytes_sent": stats.delivered_bytes,
        "packets_sent": stats.packets_sent,
        "packets_lost": stats.packets_lost,
        "cc": stats.name,
        "state": stats.state,
        "srtt_ms": round(1000 * (stats.smoothed_rtt or 0.0), 3),
        "min_rtt_ms": round(1000 * (stats.min_rtt or 0.0), 3),
        "cwnd": stats.congestion_window,
        "pacing_mbit": round(8e-6 * (stats.pacing_rate or 0.0), 3),
        "bw_mbit": round(8e-6 * (stats.bandwidth_estimate or 0.0), 3),
        "congestion_events": stats.congestion_events,
    }


async def _trace(channel: QuicByteChannel, path: str, t0: float) -> None:
    """Append the controller's state every K_TRACE_EVERY seconds (startup, back-offs, stalls)."""
    with open(path, "a", encoding="utf-8") as fh:
        while True:
            s = channel.statistics()
            line = {
                "pid": os.getpid(),
                "t": round(time.monotonic() - t0, 3),
                **_stats_json(s),
                "inflight": s.bytes_in_flight,
                "cpu_s": round(time.process_time(), 3),
            }
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            await asyncio.sleep(K_TRACE_EVERY)


async def _send_one(connect: str, *, duration: float, cc: str) -> dict[str, Any]:
    """Send for ``duration`` seconds (and on until the receiver closes); return the sender JSON."""
    host, port = _split(connect)
    carrier = QuicCarrier(_config(cc))
    give_up = time.monotonic() + K_CONNECT_TIMEOUT
    channel: QuicByteChannel | None = None
    while channel is None:
        try:
            channel = await carrier.connect(host, port, tls=None, server_hostname=None, timeout=2.0)
        except PeerUnavailableError:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.05)
    cpu0, wall0 = time.process_time(), time.monotonic()
    payload = K_HEADER.pack(duration) + bytes(K_CHUNK - K_HEADER.size)
    filler = bytes(K_CHUNK)
    t0 = time.monotonic()
    deadline = t0 + duration
    at_deadline: dict[str, Any] | None = None
    written = 0
    error = ""
    chunk = payload
    trace_path = os.environ.get(K_TRACE_ENV)
    tracer = asyncio.create_task(_trace(channel, trace_path, t0)) if trace_path else None
    try:
        while time.monotonic() < deadline + K_SEND_GRACE:
            if at_deadline is None and time.monotonic() >= deadline:
                at_deadline = {**_stats_json(channel.statistics()), **_cpu(cpu0, wall0)}
            try:
                await channel.send(chunk)
            except PeerUnavailableError as exc:
                # The receiver closing at the end of its window is the normal end; its window started
                # a little after ours, so it may close a moment before our deadline.
                if time.monotonic() < deadline - max(1.0, 0.1 * duration):
                    error = str(exc)
                break
            written += len(chunk)
            chunk = filler
    finally:
        if tracer is not None:
            tracer.cancel()
        final = channel.statistics()
        await carrier.aclose()
    out = at_deadline if at_deadline is not None else {**_stats_json(final), **_cpu(cpu0, wall0)}
    out["stream_bytes"] = written
    out["final"] = _stats_json(final)
    if error:
        out["error"] = error
    return out


def send(connect: str, *, duration: float, cc: str, connections: int = 1) -> dict[str, Any]:
    """``connections`` senders, one process and one QUIC connection each; the merged sender JSON."""
    ctx = multiprocessing.get_context("fork")
    results: Queue[dict[str, Any]] = ctx.Queue()
    workers = []
    for _ in range(connections - 1):
        proc = ctx.Process(target=_send_worker, args=(connect, duration, cc, results), daemon=True)
        proc.start()
        workers.append(proc)
    outs = [_run(_send_one(connect, duration=duration, cc=cc))]
    outs += _collect(results, workers)
    if len(outs) == 1:
        return outs[0]
    merged = dict(outs[0])
    for key in ("bytes_sent", "packets_sent", "packets_lost", "stream_bytes"):
        merged[key] = sum(int(o.get(key, 0)) for o in outs)
    merged["connections"] = len(outs)
    merged["per_connection"] = [{k: v for k, v in o.items() if k != "final"} for o in outs]
    errors = [o["error"] for o in outs if "error" in o]
    merged.pop("error", None)
    if errors:
        merged["error"] = errors[0]
    return merged


def _send_worker(connect: str, duration: float, cc: str, results: Queue[dict[str, Any]]) -> None:
    _die_with_parent()
    try:
        results.put(_run(_send_one(connect, duration=duration, cc=cc)))
    except FedgateError as exc:
        results.put({"error": str(exc)})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedgate.congestion.quic_bulk", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="receive one transfer and print its goodput window")
    s.add_argument("--listen", required=True, metavar="HOST:PORT")
    s.add_argument("--accept-timeout", type=float, default=K_ACCEPT_TIMEOUT, metavar="S")
    s.add_argument("--connections", type=int, default=_default_connections(), metavar="N", help=K_CONN_HELP)
    c = sub.add_parser("send", help="send for a duration")
    c.add_argument("--connect", required=True, metavar="HOST:PORT")
    c.add_argument("--duration", type=float, required=True, metavar="S")
    c.add_argument("--cc", default=QuicConfig().congestion_control, metavar="NAME")
    c.add_argument("--connections", type=int, default=_default_connections(), metavar="N", help=K_CONN_HELP)
    return p


def _default_connections() -> int:
    text = os.environ.get(K_CONNECTIONS_ENV, "")
    return int(text) if text.isdigit() and int(text) > 0 else K_DEFAULT_CONNECTIONS


def _run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: dict[str, Any] = uvloop.run(coro)
    return result


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    try:
        if args.connections < 1:
            raise ConfigError("must be >= 1", path="--connections")
        if args.cmd == "serve":
            out = serve(args.listen, accept_timeout=args.accept_timeout, connections=args.connections)
        else:
            check_controller_name(args.cc, path="--cc")
            out = send(args.connect, duration=args.duration, cc=args.cc, connections=args.connections)
    except FedgateError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        print(f"quic_bulk: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
