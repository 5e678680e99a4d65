"""UDP probes that check an emulated link against its settings: RTT, loss fraction, rate.

Usage (each prints ONE JSON line on stdout at the end)::

    python -m fedgate.bench.udp_probe echo  --listen HOST:PORT [--idle S]
    python -m fedgate.bench.udp_probe ping  --connect HOST:PORT --count N [--interval S] [--wait S]
    python -m fedgate.bench.udp_probe sink  --listen HOST:PORT [--idle S]
    python -m fedgate.bench.udp_probe blast --connect HOST:PORT --count N --size BYTES --pps RATE

Rules of this module:

1. ``echo`` and ``sink`` end after ``--idle`` seconds without a datagram (once one has arrived;
   before that they wait K_FIRST_WAIT seconds). ``ping`` sends probes paced by ``--interval`` and
   reads replies as they arrive, until all are back or ``--wait`` seconds after the last send; a lost
   probe simply has no RTT.
2. ``blast`` paces by absolute schedule (packet i leaves at start + i / pps), so a slow scheduler
   slice is caught up rather than lowering the rate; ``sink`` reports first/last arrival times so the
   caller can compute the arrival rate over the busy period.
3. Every datagram carries a sequence number; ``sink`` counts distinct ones, so duplicates never hide loss.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

K_HEAD = struct.Struct("!Id")  # sequence number, send time (monotonic seconds)
K_FIRST_WAIT = 15.0  # seconds a receiver waits for its first datagram
K_RCVBUF = 8 << 20  # bytes of receive buffer requested


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def _bind(listen: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, K_RCVBUF)
    sock.bind(_split(listen))
    return sock


def echo(listen: str, *, idle: float) -> dict[str, Any]:
    """Send every datagram back to its sender."""
    n = 0
    with _bind(listen) as sock:
        sock.settimeout(K_FIRST_WAIT)
        while True:
            try:
                data, peer = sock.recvfrom(65536)
            except TimeoutError:
                break
            sock.sendto(data, peer)
            n += 1
            sock.settimeout(idle)
    return {"echoed": n}


def ping(connect: str, *, count: int, interval: float, wait: float) -> dict[str, Any]:
    """Send ``count`` probes; RTTs in milliseconds, in sequence order (None when lost).

    Replies are read as they arrive (select() until the next send is due), so a reply is never
    stamped late by the sender's pacing.
    """
    rtts: list[float | None] = [None] * count
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(_split(connect))
        sock.setblocking(False)
        pad = bytes(32)
        start = time.monotonic()
        seq = 0
        deadline = start + (count - 1) * interval + wait
        while time.monotonic() < deadline and any(r is None for r in rtts):
            now = time.monotonic()
            if seq < count and now >= start + seq * interval:
                sock.send(K_HEAD.pack(seq, now) + pad)
                seq += 1
                continue
            until = start + seq * interval if seq < count else deadline
            if select.select([sock], [], [], max(0.0, until - now))[0]:
                while True:
                    try:
                        _note_reply(sock.recv(65536), rtts)
                    except BlockingIOError:
                        break
    got = [r for r in rtts if r is not None]
    return {"rtts_ms": rtts, "received": len(got), "lost": count - len(got)}


def _note_reply(data: bytes, rtts: list[float | None]) -> None:
    seq, sent = K_HEAD.unpack_from(data)
    if 0 <= seq < len(rtts) and rtts[seq] is None:
        rtts[seq] = (time.monotonic() - sent) * 1000.0


def sink(listen: str, *, idle: float) -> dict[str, Any]:
    """Count distinct datagrams and their bytes until idle."""
    seen: set[int] = set()
    total = 0
    first = last = 0.0
    with _bind(listen) as sock:
        sock.settimeout(K_FIRST_WAIT)
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            now = time.monotonic()
            if not seen:
                first = now
                sock.settimeout(idle)
            last = now
            seq = K_HEAD.unpack_from(data)[0]
            if seq not in seen:
                seen.add(seq)
                total += len(data)
    return {"packets": len(seen), "bytes": total, "seconds": last - first}


def blast(connect: str, *, count: int, size: int, pps: float) -> dict[str, Any]:
    """Send ``count`` datagrams of ``size`` bytes at ``pps`` per second (absolute schedule)."""
    pad = bytes(max(0, size - K_HEAD.size))
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(_split(connect))
        start = time.monotonic()
        for seq in range(count):
            due = start + seq / pps
            delay = due - time.monotonic()
            if delay > 0.0005:
                time.sleep(delay)
            try:
                sock.send(K_HEAD.pack(seq, time.monotonic()) + pad)
                sent += 1
            except OSError:  # ENOBUFS: the local queue is full; the sink's count shows it
                pass
        seconds = time.monotonic() - start
    return {"packets": sent, "bytes": sent * max(size, K_HEAD.size), "seconds": seconds}


def main(argv: Sequence[str]) -> int:
    """Run one probe; print its JSON line."""
    parser = argparse.ArgumentParser(prog="python -m fedgate.bench.udp_probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("echo", "sink"):
        p = sub.add_parser(name)
        p.add_argument("--listen", required=True, metavar="HOST:PORT")
        p.add_argument("--idle", type=float, default=2.0, metavar="S")
    p = sub.add_parser("ping")
    p.add_argument("--connect", required=True, metavar="HOST:PORT")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.02, metavar="S")
    p.add_argument("--wait", type=float, default=2.0, metavar="S")
    p = sub.add_parser("blast")
    p.add_argument("--connect", required=True, metavar="HOST:PORT")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, default=1000, metavar="BYTES")
    p.add_argument("--pps", type=float, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "echo":
        result = echo(args.listen, idle=args.idle)
    elif args.cmd == "sink":
        result = sink(args.listen, idle=args.idle)
    elif args.cmd == "ping":
        result = ping(args.connect, count=args.count, interval=args.interval, wait=args.wait)
    else:
        result = blast(args.connect, count=args.count, size=args.size, pps=args.pps)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
