"""``fedgate bench link``: link throughput next to raw TLS-over-TCP throughput, same loopback, same run.

Rules of this module: every figure is printed next to the baseline measured in the same process and
run (raw TLS 1.3 over TCP on 127.0.0.1, bulk writes, one event loop holding both ends, like the link
runs); the ratio is what to compare across machines. By default the stores are in memory (a counting
inbox that keeps ids, not payloads), so this measures the link protocol and carrier; ``--sqlite`` adds
the same cases with the receiver writing into the real SQLite store. ``--quic-workers N`` adds the link
over QUIC twice: in this process (one lane), and with both ends' QUIC in N worker processes each and N
lanes (``[quic] workers``, ``link.lanes_per_peer``); that case's ratio is against the in-process QUIC
case of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import pathlib
import ssl
import statistics
import tempfile
import time
from collections.abc import Sequence

from fedgate.config import StoreConfig
from fedgate.proxy.certs import client_context, issue_parties, party_files, server_context
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import LinkParams
from fedgate.proxy.link_listener import LinkListener
from fedgate.proxy.link_sender import LinkSender, carrier_dial
from fedgate.proxy.store import SqliteStore
from fedgate.proxy.store_api import Inbox
from fedgate.proxy.tcp_carrier import TcpCarrier
from fedgate.proxy.testing import MemoryOutbox

__all__ = ["main"]

K_MIB = 1024 * 1024  # bytes


class _CountingInbox:
    """An Inbox that remembers ids and sizes only (payloads would not fit in memory for long runs)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.count = 0
        self.bytes = 0
        self.partials: dict[str, bytearray] = {}

    async def deliver(self, envelope: Envelope) -> bool:
        if envelope.message_id in self.seen:
            return False
        self.seen.add(envelope.message_id)
        self.count += 1
        self.bytes += envelope.size
        return True

    async def deliver_many(self, envelopes: list[Envelope]) -> list[bool]:
        return [await self.deliver(env) for env in envelopes]

    async def partial_size(self, message_id: str) -> int:
        return len(self.partials.get(message_id, b""))

    async def append_partial(self, message_id: str, offset: int, chunk: bytes) -> None:
        self.partials.setdefault(message_id, bytearray()).extend(chunk)

    async def take_partial(self, message_id: str) -> bytes:
        return bytes(self.partials.pop(message_id, b""))


def _contexts(directory: pathlib.Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    issue_parties(directory, ["1", "2"])
    return server_context(*party_files(directory, "2")), client_context(*party_files(directory, "1"))


async def raw_tls(total: int, server_ctx: ssl.SSLContext | None, client_ctx: ssl.SSLContext | None) -> float:
    """Seconds to push ``total`` bytes through TLS over TCP on loopback with bulk writes."""
    done = asyncio.Event()
    received = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while received < total:
            data = await reader.read(K_MIB)
            if not data:
                break
            received += len(data)
        done.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx, limit=4 * K_MIB)
    port = server.sockets[0].getsockname()[1]
    block = memoryview(bytes(K_MIB))
    start = time.perf_counter()
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost" if client_ctx else None, limit=4 * K_MIB)
    writer.transport.set_write_buffer_limits(high=4 * K_MIB)
    sent = 0
    while sent < total:
        n = min(K_MIB, total - sent)
        writer.write(block[:n])
        await writer.drain()
        sent += n
    await done.wait()
    elapsed = time.perf_counter() - start
    writer.close()
    server.close()
    return elapsed


async def link_run(count: int, size: int, server_ctx: ssl.SSLContext | None, client_ctx: ssl.SSLContext | None,
                   *, chunk: int, window: int, sqlite_dir: pathlib.Path | None = None) -> float:
    """Seconds for ``count`` messages of ``size`` bytes to be stored and acknowledged over a link.

    With ``sqlite_dir`` the receiver stores into a fresh :class:`SqliteStore` there (the real inbox);
    otherwise into a counting in-memory inbox, which measures the link alone.
    """
    carrier = TcpCarrier()
    counting = _CountingInbox()
    store: SqliteStore | None = None
    if sqlite_dir is not None:
        db = sqlite_dir / f"bench-{count}-{size}.db"
        for stale in sqlite_dir.glob(f"{db.name}*"):
            stale.unlink()
        store = await SqliteStore.open(StoreConfig(path=db, min_free_bytes=0), max_message_bytes=2**30)
    inbox: Inbox = store if store is not None else counting
    outbox = MemoryOutbox()
    payload = bytes(size)
    for i in range(count):
        await outbox.put("2", Envelope(message_id=f"m{i}", session_id="s", topic="t", src_party="1",
                                       dst_party="2", payload=payload))
    listener = LinkListener(params=LinkParams("2", chunk_bytes=chunk, window_bytes=window), inbox=inbox,
                            allow=lambda party: True)
    server = await carrier.listen("127.0.0.1", 0, tls=server_ctx, handler=listener.handle)
    sender = LinkSender(
        peer="2", params=LinkParams("1", chunk_bytes=chunk, window_bytes=window), outbox=outbox,
        dial=carrier_dial(carrier.connect, "127.0.0.1", server.port, tls=client_ctx, server_hostname="localhost",
                          timeout=10.0),
    )
    start = time.perf_counter()
    task = asyncio.create_task(sender.run())
    while sender.statistics().messages_acked < count:
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    await sender.aclose(drain_timeout=1.0)
    task.cancel()
    await server.aclose()
    if store is not None:
        await store.aclose()
    return elapsed


async def quic_run(count: int, size: int, *, workers: int, lanes: int, secure: pathlib.Path | None, chunk: int,
                   window: int) -> float:
    """Seconds for ``count`` messages of ``size`` bytes over the link on QUIC, spread over ``lanes``.

    ``workers`` 0 runs QUIC in this process; otherwise each end has its own carrier with ``workers``
    worker processes. ``secure`` is the directory of the party certificates (None: insecure).
    """
    from fedgate.congestion.config import QuicConfig
    from fedgate.congestion.quic_link import QuicIdentity, create_carrier

    def identity(party: str) -> QuicIdentity | None:
        if secure is None:
            return None
        ca, cert, key = party_files(secure, party)
        return QuicIdentity(pathlib.Path(ca), pathlib.Path(cert), pathlib.Path(key))

    marker = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if secure is not None else None  # selects mutual TLS
    config = QuicConfig(workers=workers)
    server_carrier, client_carrier = create_carrier(config, identity=identity("2")), create_carrier(
        config, identity=identity("1"))
    inbox = _CountingInbox()
    listener = LinkListener(params=LinkParams("2", chunk_bytes=chunk, window_bytes=window), inbox=inbox,
                            allow=lambda party: True)
    server = await server_carrier.listen("127.0.0.1", 0, tls=marker, handler=listener.handle)
    payload = bytes(size)
    senders: list[LinkSender] = []
    for lane in range(lanes):
        outbox = MemoryOutbox()
        for i in range(lane, count, lanes):
            await outbox.put("2", Envelope(message_id=f"m{i}", session_id="s", topic=f"t{lane}", src_party="1",
                                           dst_party="2", payload=payload))
        senders.append(LinkSender(
            peer="2", params=LinkParams("1", chunk_bytes=chunk, window_bytes=window), outbox=outbox, lane=lane,
            dial=functools.partial(client_carrier.connect, "127.0.0.1", server.port, tls=marker,
                                   server_hostname="2" if secure is not None else None, timeout=10.0, lane=lane),
        ))
    start = time.perf_counter()
    tasks = [asyncio.create_task(sender.run()) for sender in senders]
    while sum(sender.statistics().messages_acked for sender in senders) < count:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    for sender, task in zip(senders, tasks, strict=True):
        await sender.aclose(drain_timeout=1.0)
        task.cancel()
    await server.aclose()
    for carrier in (client_carrier, server_carrier):
        await carrier.aclose()
    return elapsed


async def _bench(args: argparse.Namespace) -> None:
    """Each round measures the raw baseline, then every link case right after it; a case's ratio is
    taken against the baseline of its own round and the median over rounds is printed, so a noisy,
    shared machine moves both sides of a ratio together."""
    with tempfile.TemporaryDirectory() as tmp:
        server_ctx, client_ctx = (None, None) if args.plain else _contexts(pathlib.Path(tmp))
        total = args.total_mib * K_MIB
        mode = "plain TCP" if args.plain else "TLS 1.3 (mTLS) over TCP"
        loop_name = "uvloop" if args.uvloop else "asyncio"
        print(f"# fedgate bench link: loopback, {mode}, {loop_name}, chunk {args.chunk_kib} KiB, "
              f"window {args.window_mib} MiB, {args.rounds} round(s), medians")
        cases: list[tuple[str, int, int, pathlib.Path | None]] = [
            ("link, 1 MiB messages", args.total_mib, K_MIB, None),
            ("link, 1 KiB messages", args.small_count, 1024, None),
        ]
        if args.sqlite:
            cases += [(label + " (SQLite)", count, size, pathlib.Path(tmp)) for label, count, size, _ in cases]
        raw_rates: list[float] = []
        quic_rates: dict[str, list[tuple[float, float, float]]] = {}
        if args.quic_workers:
            quic_rates = {"QUIC link, in process": [], f"QUIC link, {args.quic_workers} workers+lanes": []}
        rates: dict[str, list[tuple[float, float, float]]] = {label: [] for label, *_ in cases}
        for _ in range(args.rounds):
            raw_rate = total / await raw_tls(total, server_ctx, client_ctx) / K_MIB
            raw_rates.append(raw_rate)
            for label, count, size, sqlite_dir in cases:
                secs = await link_run(count, size, server_ctx, client_ctx, chunk=args.chunk_kib * 1024,
                                      window=args.window_mib * K_MIB, sqlite_dir=sqlite_dir)
                rate = count * size / secs / K_MIB
                rates[label].append((rate, count / secs, rate / raw_rate))
            if args.quic_workers:
                n = args.quic_workers
                secure = None if args.plain else pathlib.Path(tmp)
                common = dict(secure=secure, chunk=args.chunk_kib * 1024, window=args.window_mib * K_MIB)
                base = total / await quic_run(args.total_mib, K_MIB, workers=0, lanes=1, **common) / K_MIB
                quic_rates["QUIC link, in process"].append((base, 0.0, 1.0))
                rate = total / await quic_run(args.total_mib, K_MIB, workers=n, lanes=n, **common) / K_MIB
                quic_rates[f"QUIC link, {n} workers+lanes"].append((rate, 0.0, rate / base))
        print(f"{'case':<30}{'MiB/s':>10}{'msg/s':>10}{'vs raw':>9}  {'ratio range':>13}")
        print(f"{'raw socket, 1 MiB writes':<30}{statistics.median(raw_rates):>10.1f}{'':>10}{1.0:>9.2f}")
        for label, runs in rates.items():
            ratios = [r for _, _, r in runs]
            print(f"{label:<30}{statistics.median(r for r, _, _ in runs):>10.1f}"
                  f"{statistics.median(m for _, m, _ in runs):>10.0f}{statistics.median(ratios):>9.2f}"
                  f"  {min(ratios):>6.2f}-{max(ratios):.2f}")
        if quic_rates:
            print(f"{'case (1 MiB messages)':<30}{'MiB/s':>10}{'':>10}{'vs QUIC in process':>20}  {'ratio range':>13}")
            for label, runs in quic_rates.items():
                ratios = [r for _, _, r in runs]
                print(f"{label:<30}{statistics.median(r for r, _, _ in runs):>10.1f}{'':>10}"
                      f"{statistics.median(ratios):>20.2f}  {min(ratios):>6.2f}-{max(ratios):.2f}")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedgate bench link", description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=256, help="MiB per bulk case (default 256)")
    parser.add_argument("--small-count", type=int, default=20000, help="1 KiB messages to send (default 20000)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="link chunk size in KiB (default 1024)")
    parser.add_argument("--window-mib", type=int, default=64, help="link credit window in MiB (default 64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (baseline, every case); medians are printed (default 3)")
    parser.add_argument("--plain", action="store_true", help="no TLS (both baseline and link)")
    parser.add_argument("--sqlite", action="store_true",
                        help="also run the link cases with the receiver storing into the real SQLite store")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--quic-workers", type=int, default=0, metavar="N",
                        help="also run 1 MiB messages over QUIC: in process, and with N worker processes per "
                             "end and N lanes (default 0: no QUIC cases)")
    args = parser.parse_args(list(argv))
    if args.uvloop:
        import uvloop

        uvloop.run(_bench(args))
    else:
        asyncio.run(_bench(args))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
