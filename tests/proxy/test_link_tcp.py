"""Loopback integration: two link endpoints in one process over TCP + mTLS (127.0.0.1), in-memory stores."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from fedgate.proxy.carrier import ByteChannel
from fedgate.proxy.certs import client_context, issue_parties, party_files, server_context
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import LinkParams
from fedgate.proxy.link_events import Rejection
from fedgate.proxy.link_listener import LinkListener
from fedgate.proxy.link_metrics import LinkMetrics
from fedgate.proxy.link_sender import LinkSender, carrier_dial
from fedgate.proxy.tcp_carrier import TcpCarrier, TcpChannel
from fedgate.proxy.testing import MemoryInbox, MemoryOutbox

SENDER, RECEIVER = "9999", "10000"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("certs")
    issue_parties(d, [SENDER, RECEIVER, "7777"])
    return d


def ctx(certs: pathlib.Path, party: str, *, server: bool) -> ssl.SSLContext:
    return (server_context if server else client_context)(*party_files(certs, party))


def message(i: int, size: int, topic: str = "t") -> Envelope:
    return Envelope(message_id=f"m{i:05d}", session_id="s", topic=topic, src_party=SENDER, dst_party=RECEIVER,
                    payload=os.urandom(size))


@dataclass
class Link:
    sender: LinkSender
    listener: LinkListener
    outbox: MemoryOutbox
    inbox: MemoryInbox
    registry: CollectorRegistry


async def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@asynccontextmanager
async def link(
    certs: pathlib.Path, *, server_party: str = RECEIVER, client_party: str = SENDER, tls: bool = True,
    wrap: Callable[[ByteChannel], ByteChannel] | None = None, chunk: int = 256 * 1024, window: int = 1 << 20,
    on_inbound: Callable[[Envelope], Rejection | None] | None = None,
) -> AsyncIterator[Link]:
    carrier = TcpCarrier()
    outbox, inbox = MemoryOutbox(), MemoryInbox()
    registry = CollectorRegistry()
    metrics = LinkMetrics(registry)

    async def inbound(env: Envelope) -> Rejection | None:
        return on_inbound(env) if on_inbound else None

    listener = LinkListener(
        params=LinkParams(RECEIVER, chunk_bytes=chunk, window_bytes=window, keepalive_s=1.0), inbox=inbox,
        allow=lambda party: party == SENDER, on_inbound=inbound, metrics=metrics, retry_max_s=0.1,
    )

    async def handle(channel: ByteChannel) -> None:
        await listener.handle(wrap(channel) if wrap else channel)

    server = await carrier.listen("127.0.0.1", 0, tls=ctx(certs, server_party, server=True) if tls else None,
                                  handler=handle)
    dial = carrier_dial(carrier.connect, "127.0.0.1", server.port,
                        tls=ctx(certs, client_party, server=False) if tls else None, server_hostname=None, timeout=5.0)
    sender = LinkSender(peer=RECEIVER, params=LinkParams(client_party, chunk_bytes=chunk, keepalive_s=1.0),
                        outbox=outbox, dial=dial, backoff_initial_s=0.05, backoff_max_s=0.2, metrics=metrics)
    task = asyncio.create_task(sender.run())
    try:
        yield Link(sender, listener, outbox, inbox, registry)
    finally:
        await sender.aclose(drain_timeout=1.0)
        task.cancel()
        await server.aclose()


def test_messages_arrive_exactly_once_in_order_over_mtls(certs: pathlib.Path) -> None:
    async def main() -> None:
        async with link(certs) as lk:
            msgs = [message(i, 1000 if i % 7 else 700_000, topic=f"t{i % 3}") for i in range(120)]
            for m in msgs:
                await lk.outbox.put(RECEIVER, m)
            await wait_for(lambda: len(lk.outbox.acked) == len(msgs))
            assert sorted(lk.inbox.order) == [m.message_id for m in msgs] and lk.inbox.duplicates == 0
            for t in range(3):
                expect = [m for m in msgs if m.topic == f"t{t}"]
                assert [e.payload for e in lk.inbox.queues[("s", f"t{t}")]] == [m.payload for m in expect]
            stats = lk.sender.statistics()
            assert stats.connected and stats.messages_acked == 120 and stats.bytes_acked == sum(m.size for m in msgs)
            assert lk.listener.statistics().peers == (SENDER,)
            assert lk.registry.get_sample_value("fedgate_link_acked_messages_total", {"peer": RECEIVER}) == 120

    asyncio.run(main())


def test_cut_mid_transfer_resumes_from_last_staged_chunk(certs: pathlib.Path) -> None:
    cuts: list[int] = []

    class CutOnce:
        """Aborts the first inbound connection after 6 MiB, like a pulled cable."""

        def __init__(self, inner: ByteChannel) -> None:
            self.inner, self.seen = inner, 0

        @property
        def peer_party(self) -> str | None:
            return self.inner.peer_party

        @property
        def description(self) -> str:
            return self.inner.description

        async def send(self, data: bytes | memoryview) -> None:
            await self.inner.send(data)

        async def receive(self) -> bytes:
            data = await self.inner.receive()
            self.seen += len(data)
            if not cuts and self.seen > 6 << 20:
                cuts.append(self.seen)
                assert isinstance(self.inner, TcpChannel)
                self.inner.abort()
            return data

        async def aclose(self) -> None:
            await self.inner.aclose()

    async def main() -> None:
        async with link(certs, wrap=CutOnce) as lk:
            big = message(1, 16 << 20)
            small = message(2, 10)
            await lk.outbox.put(RECEIVER, big)
            await lk.outbox.put(RECEIVER, small)
            await wait_for(lambda: len(lk.outbox.acked) == 2)
            assert cuts and lk.sender.statistics().reconnects >= 1
            assert lk.inbox.order == [big.message_id, small.message_id]
            assert lk.inbox.queues[("s", "t")][0].payload == big.payload
            # Resumed, not restarted: what crossed the wire is the message plus at most the credit window
            # that was in flight at the cut (1 MiB here), never a second full copy.
            assert lk.sender.statistics().bytes_sent < big.size + 2 * (1 << 20)
            assert lk.inbox.appended_bytes == big.size

    asyncio.run(main())


def test_wrong_party_certificate_is_refused_with_a_log_line(
    certs: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with link(certs, server_party="7777") as lk:
            await lk.outbox.put(RECEIVER, message(1, 10))
            await wait_for(lambda: lk.sender.statistics().reconnects >= 1)
            assert lk.inbox.order == [] and lk.outbox.acked == []
            assert "certificate says party '7777'" in lk.sender.statistics().last_error

    with caplog.at_level(logging.ERROR, logger="fedgate.link"):
        asyncio.run(main())
    assert any("refusing link to party 10000" in r.getMessage() and "'7777'" in r.getMessage()
               for r in caplog.records)


def test_party_not_allowed_is_refused_by_the_listener(certs: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with link(certs, client_party="7777") as lk:
            await lk.outbox.put(RECEIVER, message(1, 10))
            await wait_for(lambda: lk.listener.statistics().refused >= 1)
            await asyncio.sleep(0.1)
            assert lk.inbox.order == [] and lk.outbox.acked == []

    with caplog.at_level(logging.ERROR, logger="fedgate.link"):
        asyncio.run(main())
    assert any("party '7777' is not allowed" in r.getMessage() for r in caplog.records)


def test_store_full_holds_back_and_loses_nothing(certs: pathlib.Path) -> None:
    async def main() -> None:
        async with link(certs, chunk=64 * 1024, window=256 * 1024) as lk:
            lk.inbox.full = True
            msgs = [message(i, 50_000) for i in range(40)]
            for m in msgs:
                await lk.outbox.put(RECEIVER, m)
            await wait_for(lambda: lk.listener.statistics().store_full_retries >= 5)
            assert lk.inbox.order == [] and lk.outbox.acked == []
            assert lk.sender.statistics().bytes_sent <= 256 * 1024  # stopped by credit, not buffering on
            lk.inbox.full = False
            await wait_for(lambda: len(lk.outbox.acked) == len(msgs))
            assert lk.inbox.order == [m.message_id for m in msgs] and lk.inbox.duplicates == 0

    asyncio.run(main())


def test_rejected_message_is_final_and_the_rest_flows(certs: pathlib.Path) -> None:
    def audit(env: Envelope) -> Rejection | None:
        return Rejection(env.message_id, "no-pickle", "os.system") if env.message_id == "m00001" else None

    async def main() -> None:
        async with link(certs, on_inbound=audit) as lk:
            for i in range(3):
                await lk.outbox.put(RECEIVER, message(i, 100))
            await wait_for(lambda: len(lk.outbox.acked) == 3)
            assert lk.inbox.order == ["m00000", "m00002"]
            assert lk.sender.statistics().messages_rejected == 1
            assert lk.listener.statistics().rejected == 1

    asyncio.run(main())


def test_plain_text_mode(certs: pathlib.Path) -> None:
    async def main() -> None:
        async with link(certs, tls=False) as lk:
            await lk.outbox.put(RECEIVER, message(1, 3000))
            await wait_for(lambda: lk.outbox.acked == ["m00001"])

    asyncio.run(main())


def test_bench_runs_and_prints_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    from fedgate.proxy.link_bench import main

    assert main(["--total-mib", "2", "--small-count", "50", "--rounds", "1", "--sqlite", "--chunk-kib", "256",
                 "--window-mib", "4"]) == 0
    out = capsys.readouterr().out
    for case in ("raw socket, 1 MiB writes", "link, 1 MiB messages", "link, 1 KiB messages",
                 "link, 1 MiB messages (SQLite)", "link, 1 KiB messages (SQLite)"):
        assert case in out
