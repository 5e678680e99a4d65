"""RDMA carrier benchmark: message rate, bandwidth and latency next to TCP, on the same hosts.

Rules of this module:

1. For real RDMA hardware (a pair of hosts); the soft-RoCE QEMU guest only proves it runs. Every
   figure is printed with its ratio to the TCP baseline measured in the same command, between the
   same two hosts, with the same message sizes and the same asyncio process shape.
2. Two roles: ``server`` listens for the RDMA carrier on PORT and for plain TCP on PORT+1; ``client``
   connects to both and runs, per transport and size, a streaming test of ``--seconds`` (bandwidth,
   message rate; at least ``--rounds`` messages) and ``--rounds`` ping-pongs (median round trip).
   ``local`` runs both roles in one process (smoke test).
3. The TCP baseline frames messages with a 4-byte length over asyncio streams: what a TCP link
   carrier does, without TLS (``--tls`` is not offered: compare like with like).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedgate.proxy.carrier import ByteChannel
from fedgate.rdma.config import RdmaConfig

__all__ = ["main"]

K_DEFAULT_SIZES = (1024, 1024 * 1024, 64 * 1024 * 1024)  # bytes
K_END = b"\x00END"  # end of a stream test; data messages are at least 16 bytes
K_LEN = struct.Struct("!I")
K_SEED_GBPS = (4.9, 6.3)  # the seed rollsite's RDMA bandwidth, GB/s
K_SEED_LATENCY = (0.21, 0.29)  # the seed's RDMA latency as a fraction of TCP's


class TcpChannel:
    """Length-prefixed messages over a TCP stream: the baseline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def send(self, data: bytes) -> None:
        self._writer.write(K_LEN.pack(len(data)))
        self._writer.write(data)
        await self._writer.drain()

    async def receive(self) -> bytes:
        try:
            (length,) = K_LEN.unpack(await self._reader.readexactly(K_LEN.size))
            return await self._reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return b""

    async def aclose(self) -> None:
        self._writer.close()


Channel = ByteChannel | TcpChannel


async def serve_channel(channel: Channel) -> None:
    """The server side of both tests, driven by JSON requests from the client."""
    while request := await channel.receive():
        op = json.loads(request)
        if op["op"] == "stream":
            count = total = 0
            while (msg := await channel.receive()) != K_END:
                if not msg:
                    return
                count += 1
                total += len(msg)
            await channel.send(json.dumps({"count": count, "bytes": total}).encode())
        elif op["op"] == "pingpong":
            for _ in range(op["count"]):
                await channel.send(await channel.receive())


@dataclass(frozen=True, slots=True)
class Result:
    transport: str
    size: int
    msgs_per_s: float
    gbytes_per_s: float
    rtt_us: float


async def measure(channel: Channel, transport: str, size: int, *, seconds: float, min_msgs: int) -> Result:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    await channel.send(json.dumps({"op": "stream"}).encode())
    start = time.perf_counter()
    sent = 0
    while sent < min_msgs or time.perf_counter() - start < seconds:
        await channel.send(payload)
        sent += 1
    await channel.send(K_END)
    reply = json.loads(await channel.receive())
    elapsed = time.perf_counter() - start
    if reply["count"] != sent or reply["bytes"] != sent * size:
        raise RuntimeError(f"{transport}: server counted {reply}, client sent {sent} x {size}")
    await channel.send(json.dumps({"op": "pingpong", "count": min_msgs}).encode())
    rtts = []
    for _ in range(min_msgs):  # a fixed count: the server must know how many to echo
        t0 = time.perf_counter()
        await channel.send(payload)
        echoed = await channel.receive()
        rtts.append(time.perf_counter() - t0)
        if len(echoed) != size:
            raise RuntimeError(f"{transport}: echo of {len(echoed)} bytes, sent {size}")
    return Result(transport, size, sent / elapsed, sent * size / elapsed / 1e9, statistics.median(rtts) * 1e6)


class _Closable(Protocol):
    async def aclose(self) -> None: ...


class _TcpServer:
    def __init__(self, server: asyncio.Server) -> None:
        self._server = server

    async def aclose(self) -> None:
        await asyncio.sleep(0.2)  # let the handlers see their clients' EOF first
        self._server.close()
        await self._server.wait_closed()


async def open_channels(
    host: str, port: int, config: RdmaConfig, transports: Sequence[str], closers: list[_Closable]
) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    if "rdma" in transports:
        from fedgate.rdma.verbs_link import RdmaCarrier

        carrier = RdmaCarrier(config)
        closers.append(carrier)  # explicit, ordered teardown of the device at the end
        channels["rdma"] = await carrier.connect(host, port, tls=None, server_hostname=None, timeout=30.0)
    if "tcp" in transports:
        reader, writer = await asyncio.open_connection(host, port + 1, limit=1 << 20)
        channels["tcp"] = TcpChannel(reader, writer)
    return channels


async def start_servers(host: str, port: int, config: RdmaConfig, transports: Sequence[str]) -> list[_Closable]:
    servers: list[_Closable] = []
    if "rdma" in transports:
        from fedgate.rdma.verbs_link import RdmaCarrier

        carrier = RdmaCarrier(config)
        servers.append(await carrier.listen(host, port, tls=None, handler=serve_channel))
        servers.append(carrier)

    async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_channel(TcpChannel(reader, writer))
        writer.close()

    if "tcp" in transports:
        servers.append(_TcpServer(await asyncio.start_server(tcp_client, host, port + 1, limit=1 << 20)))
    return servers


def report(results: list[Result]) -> str:
    lines = [f"{'size':>10} {'transport':>9} {'msgs/s':>12} {'GB/s':>8} {'rtt p50 us':>11}  vs tcp"]
    by_key = {(r.transport, r.size): r for r in results}
    for r in results:
        base = by_key.get(("tcp", r.size))
        versus = ""
        if base is not None and r.transport != "tcp":
            bandwidth = r.gbytes_per_s / base.gbytes_per_s
            versus = f"bandwidth x{bandwidth:.2f}, latency {r.rtt_us / base.rtt_us:.0%} of tcp"
        figures = f"{r.msgs_per_s:>12.0f} {r.gbytes_per_s:>8.3f} {r.rtt_us:>11.1f}"
        lines.append(f"{_size(r.size):>10} {r.transport:>9} {figures}  {versus}")
    lines.append(
        f"seed rollsite on RDMA hardware: {K_SEED_GBPS[0]}-{K_SEED_GBPS[1]} GB/s, latency "
        f"{K_SEED_LATENCY[0]:.0%}-{K_SEED_LATENCY[1]:.0%} of TCP"
    )
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


async def run_client(args: argparse.Namespace, config: RdmaConfig) -> list[Result]:
    host, port = _hostport(args.connect)
    closers: list[_Closable] = []
    results = []
    try:
        channels = await open_channels(host, port, config, args.transports, closers)
        try:
            for size in args.sizes:
                for transport in args.transports:
                    rounds = args.rounds if size < 1 << 24 else max(3, args.rounds // 100)
                    results.append(
                        await measure(channels[transport], transport, size, seconds=args.seconds, min_msgs=rounds)
                    )
        finally:
            for channel in channels.values():
                await channel.aclose()
    finally:
        for closer in closers:
            await closer.aclose()
    return results


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def _amain(args: argparse.Namespace) -> int:
    config = RdmaConfig(device=args.device, gid_index=args.gid_index)
    if args.role == "server":
        host, port = _hostport(args.listen)
        await start_servers(host, port, config, args.transports)
        print(f"serving rdma on {host}:{port}, tcp on {host}:{port + 1}; Ctrl-C to stop", flush=True)
        await asyncio.Event().wait()
        return 0
    if args.role == "local":
        host, port = _hostport(args.listen)
        servers = await start_servers(host, port, config, args.transports)
        args.connect = f"{host}:{port}"
        results = await run_client(args, config)
        for server in servers:
            await server.aclose()
    else:
        results = await run_client(args, config)
    print(report(results), flush=True)
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedgate bench rdma", description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["server", "client", "local"])
    parser.add_argument("--listen", default="0.0.0.0:18515", help="server/local: host:port (tcp uses port+1)")
    parser.add_argument("--connect", default="", help="client: the server's host:port")
    parser.add_argument("--sizes", default=",".join(map(str, K_DEFAULT_SIZES)), help="message sizes in bytes")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each streaming test")
    parser.add_argument("--rounds", type=int, default=1000, help="ping-pong rounds (/100 at 16 MiB and up)")
    parser.add_argument("--transports", default="rdma,tcp", help="comma list of rdma, tcp")
    parser.add_argument("--device", default="", help="RDMA device (default: the first one)")
    parser.add_argument("--gid-index", type=int, default=-1, help="GID index (default: auto)")
    args = parser.parse_args(list(argv))
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.transports = [t for t in args.transports.split(",") if t]
    if any(s < 16 for s in args.sizes) or not set(args.transports) <= {"rdma", "tcp"}:
        parser.error("sizes must be >= 16 bytes and transports among rdma, tcp")
    if args.role == "client" and not args.connect:
        parser.error("client needs --connect host:port")
    try:
        return asyncio.run(_amain(args))
    except KeyboardInterrupt:
        return 130
