"""Kernel TCP bulk transfer, the benchmark's reference transport (CUBIC, BBR or any kernel CC).

Usage (the transport-runner contract: each side prints ONE JSON line on stdout at the end)::

    python -m fedgate.bench.tcp_bulk serve --listen HOST:PORT
    python -m fedgate.bench.tcp_bulk send --connect HOST:PORT --duration S --cc cubic|bbr

Rules of this module:

1. The measured window is the receiver's: it starts when the receiver accepts the connection and lasts
   exactly the duration the sender announces in an 8-byte header (a big-endian double, seconds). The
   receiver then closes, which resets the sender. Goodput = payload bytes the receiver application
   read inside the window / window; no tail of send buffers drains outside it.
2. The sender keeps sending past its own deadline (until reset, or K_SEND_GRACE seconds more) so the
   pipe stays full until the receiver's window closes; its TCP_INFO is sampled at its own deadline.
3. The congestion control is set per socket (``TCP_CONGESTION``): inside a non-initial network
   namespace the default cannot be changed. The name actually in effect is read back and reported.
4. Receiver JSON: ``bytes``, ``seconds``. Sender JSON: ``bytes_sent`` (payload bytes acknowledged),
   ``packets_sent`` (data segments, retransmissions included), ``packets_lost`` (retransmitted
   segments), plus ``cc``, ``srtt_ms``, ``min_rtt_ms``, ``bytes_retrans`` and ``snd_cwnd``.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "parse_tcp_info"]

K_CHUNK = 1 << 20  # bytes per send/recv call
K_HEADER = struct.Struct("!d")  # the announced duration, seconds
K_SEND_GRACE = 10.0  # seconds the sender goes on past its deadline waiting for the receiver's reset
K_ACCEPT_TIMEOUT = 60.0  # seconds the receiver waits for a connection
K_CONNECT_TIMEOUT = 10.0  # seconds the sender retries a refused connection
K_TCP_INFO_LEN = 232  # bytes of struct tcp_info requested (fields up to tcpi_rcv_wnd)

# (name, struct format, byte offset) in struct tcp_info (linux/tcp.h), stable since Linux 4.19.
K_TCP_INFO_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("state", "B", 0),
    ("snd_mss", "I", 16),
    ("lost", "I", 32),
    ("retrans", "I", 36),
    ("rtt_us", "I", 68),
    ("snd_ssthresh", "I", 76),
    ("snd_cwnd", "I", 80),
    ("total_retrans", "I", 100),
    ("bytes_acked", "Q", 120),
    ("bytes_received", "Q", 128),
    ("segs_out", "I", 136),
    ("min_rtt_us", "I", 148),
    ("data_segs_out", "I", 156),
    ("delivery_rate", "Q", 160),
    ("bytes_sent", "Q", 200),
    ("bytes_retrans", "Q", 208),
)


def parse_tcp_info(raw: bytes) -> dict[str, int]:
    """Decode the fields of K_TCP_INFO_FIELDS that ``raw`` is long enough to hold (pure)."""
    out: dict[str, int] = {}
    for name, fmt, offset in K_TCP_INFO_FIELDS:
        size = struct.calcsize(fmt)
        if len(raw) >= offset + size:
            out[name] = struct.unpack_from("=" + fmt, raw, offset)[0]
    return out


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def serve(listen: str, *, accept_timeout: float) -> dict[str, Any]:
    """Receive one connection for the announced window; return the receiver JSON."""
    host, port = _split(listen)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, port))
        lsock.listen(1)
        lsock.settimeout(accept_timeout)
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            return {"bytes": 0, "seconds": 0.0, "error": "no connection"}
    with conn:
        t0 = time.monotonic()
        buf = bytearray(K_CHUNK)
        view = memoryview(buf)
        head = b""
        total = 0
        deadline = t0 + K_ACCEPT_TIMEOUT  # until the header tells the real window
        duration = None
        error = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn.settimeout(remaining)
            try:
                n = conn.recv_into(view)
            except TimeoutError:
                break
            except OSError as exc:
                error = str(exc)
                break
            if n == 0:
                error = "sender closed early"
                break
            if duration is None:
                head += bytes(view[:n])
                if len(head) < K_HEADER.size:
                    continue
                duration = K_HEADER.unpack_from(head)[0]
                deadline = t0 + duration
                total += len(head) - K_HEADER.size
            else:
                total += n
        seconds = min(time.monotonic(), deadline) - t0
        # closing with unread data resets the sender, ending its run
    result: dict[str, Any] = {"bytes": total, "seconds": seconds}
    if error:
        result["error"] = error
    return result


def _connect(host: str, port: int, cc: str) -> socket.socket:
    deadline = time.monotonic() + K_CONNECT_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        try:
            sock.connect((host, port))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        except BaseException:
            sock.close()
            raise


def send(connect: str, *, duration: float, cc: str) -> dict[str, Any]:
    """Send for ``duration`` seconds (and on until the receiver resets); return the sender JSON."""
    host, port = _split(connect)
    sock = _connect(host, port, cc)
    with sock:
        in_effect = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()
        payload = memoryview(K_HEADER.pack(duration) + bytes(K_CHUNK - K_HEADER.size))
        filler = memoryview(bytes(K_CHUNK))
        t0 = time.monotonic()
        deadline = t0 + duration
        info: dict[str, int] = {}
        sock.settimeout(0.2)
        chunk = payload
        while True:
            now = time.monotonic()
            if not info and now >= deadline:
                info = parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, K_TCP_INFO_LEN))
            if now >= deadline + K_SEND_GRACE:
                break
            try:
                sent = sock.send(chunk)
            except TimeoutError:
                continue
            except OSError:
                break  # the receiver closed its window: reset or broken pipe
            chunk = chunk[sent:] if sent < len(chunk) else filler
        if not info:
            info = parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, K_TCP_INFO_LEN))
    return {
        "bytes_sent": max(0, info.get("bytes_acked", 0) - K_HEADER.size),
        "packets_sent": info.get("data_segs_out", 0),
        "packets_lost": info.get("total_retrans", 0),
        "bytes_retrans": info.get("bytes_retrans", 0),
        "cc": in_effect,
        "srtt_ms": info.get("rtt_us", 0) / 1000.0,
        "min_rtt_ms": info.get("min_rtt_us", 0) / 1000.0,
        "snd_cwnd": info.get("snd_cwnd", 0),
        "seconds": duration,
    }


def main(argv: Sequence[str]) -> int:
    """``serve`` or ``send``; prints one JSON line; exit 0 on a measured run."""
    parser = argparse.ArgumentParser(prog="python -m fedgate.bench.tcp_bulk")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="receive one connection, print bytes and seconds")
    p_serve.add_argument("--listen", required=True, metavar="HOST:PORT")
    p_serve.add_argument("--accept-timeout", type=float, default=K_ACCEPT_TIMEOUT, metavar="S")
    p_send = sub.add_parser("send", help="send for a fixed duration, print TCP_INFO figures")
    p_send.add_argument("--connect", required=True, metavar="HOST:PORT")
    p_send.add_argument("--duration", type=float, required=True, metavar="S")
    p_send.add_argument("--cc", default="cubic", help="kernel congestion control (cubic, bbr, reno)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "serve":
            result = serve(args.listen, accept_timeout=args.accept_timeout)
        else:
            result = send(args.connect, duration=args.duration, cc=args.cc)
    except OSError as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 1 if "error" in result and not result.get("bytes") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
