"""QUIC bulk transfer over fedgate's QUIC carrier, for the WAN benchmark (``fedgate bench wan``).

Usage (the transport-runner contract: each side prints ONE JSON line on stdout at the end)::

    python -m fedgate.congestion.quic_bulk serve --listen HOST:PORT
    python -m fedgate.congestion.quic_bulk send --connect HOST:PORT --duration S [--cc ltbbr|newreno]

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
   ``stream_bytes`` (payload handed to QUIC).
5. uvloop runs the event loop when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from fedgate.congestion import CongestionStatistics, check_controller_name
from fedgate.congestion.config import QuicConfig
from fedgate.congestion.quic_link import QuicByteChannel, QuicCarrier
from fedgate.errors import FedgateError, PeerUnavailableError
from fedgate.proxy.carrier import ByteChannel

__all__ = ["main"]

K_HEADER = struct.Struct("!d")  # the announced duration, seconds
K_CHUNK = 1 << 20  # bytes per send call
K_SEND_GRACE = 10.0  # seconds the sender goes on past its deadline waiting for the receiver to close
K_ACCEPT_TIMEOUT = 60.0  # seconds the receiver waits for a connection
K_CONNECT_TIMEOUT = 10.0  # seconds the sender retries the handshake
K_MIB = 1 << 20  # bytes
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


async def serve(listen: str, *, accept_timeout: float = K_ACCEPT_TIMEOUT) -> dict[str, Any]:
    """Receive one stream for the announced window; return the receiver JSON."""
    host, port = _split(listen)
    carrier = QuicCarrier(_config("ltbbr"))
    result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def handler(channel: ByteChannel) -> None:
        t0 = time.monotonic()
        deadline = t0 + K_ACCEPT_TIMEOUT
        head = b""
        total = 0
        duration: float | None = None
        error = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                data = await asyncio.wait_for(channel.receive(), remaining)
            except TimeoutError:
                break
            except PeerUnavailableError as exc:
                error = str(exc)
                break
            if not data:
                error = "sender closed early"
                break
            if duration is None:
                head += data
                if len(head) < K_HEADER.size:
                    continue
                duration = K_HEADER.unpack_from(head)[0]
                deadline = t0 + duration
                total += len(head) - K_HEADER.size
            else:
                total += len(data)
        seconds = min(time.monotonic(), deadline) - t0
        out: dict[str, Any] = {"bytes": total, "seconds": seconds}
        if error:
            out["error"] = error
        if not result.done():
            result.set_result(out)

    server = await carrier.listen(host, port, tls=None, handler=handler)
    try:
        return await asyncio.wait_for(asyncio.shield(result), accept_timeout + K_ACCEPT_TIMEOUT)
    except TimeoutError:
        return {"bytes": 0, "seconds": 0.0, "error": "no connection"}
    finally:
        await server.aclose()
        await asyncio.sleep(0.05)  # let CONNECTION_CLOSE leave


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


async def send(connect: str, *, duration: float, cc: str) -> dict[str, Any]:
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
    payload = K_HEADER.pack(duration) + bytes(K_CHUNK - K_HEADER.size)
    filler = bytes(K_CHUNK)
    t0 = time.monotonic()
    deadline = t0 + duration
    at_deadline: dict[str, Any] | None = None
    written = 0
    error = ""
    chunk = payload
    try:
        while time.monotonic() < deadline + K_SEND_GRACE:
            if at_deadline is None and time.monotonic() >= deadline:
                at_deadline = _stats_json(channel.statistics())
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
        final = channel.statistics()
        await carrier.aclose()
    out = at_deadline if at_deadline is not None else _stats_json(final)
    out["stream_bytes"] = written
    out["final"] = _stats_json(final)
    if error:
        out["error"] = error
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedgate.congestion.quic_bulk", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="receive one transfer and print its goodput window")
    s.add_argument("--listen", required=True, metavar="HOST:PORT")
    s.add_argument("--accept-timeout", type=float, default=K_ACCEPT_TIMEOUT, metavar="S")
    c = sub.add_parser("send", help="send for a duration")
    c.add_argument("--connect", required=True, metavar="HOST:PORT")
    c.add_argument("--duration", type=float, required=True, metavar="S")
    c.add_argument("--cc", default=QuicConfig().congestion_control, metavar="NAME")
    return p


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
        if args.cmd == "serve":
            out = _run(serve(args.listen, accept_timeout=args.accept_timeout))
        else:
            check_controller_name(args.cc, path="--cc")
            out = _run(send(args.connect, duration=args.duration, cc=args.cc))
    except FedgateError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        print(f"quic_bulk: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
