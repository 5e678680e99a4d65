"""Adapter tests over the in-memory carrier: reconnects, chaos, drain, statistics, metrics."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import LinkParams
from fedgate.proxy.link_events import Rejection
from fedgate.proxy.link_listener import LinkListener
from fedgate.proxy.link_metrics import LinkMetrics
from fedgate.proxy.link_sender import LinkSender, RejectedHook, backoff_delays, carrier_dial
from fedgate.proxy.store_api import OutboxItem
from fedgate.proxy.testing import MemoryCarrier, MemoryInbox, MemoryOutbox

SENDER, RECEIVER = "9999", "10000"
CHUNK = 8192


@dataclass
class Rig:
    carrier: MemoryCarrier
    sender: LinkSender
    listener: LinkListener
    outbox: MemoryOutbox
    inbox: MemoryInbox
    registry: CollectorRegistry
    metrics: LinkMetrics


@asynccontextmanager
async def rig(*, window: int = 16 * CHUNK, keepalive: float = 0.5, max_message: int = 2**32,
              on_rejected: RejectedHook | None = None) -> AsyncIterator[Rig]:
    carrier = MemoryCarrier(client_party=SENDER, server_party=RECEIVER)
    outbox, inbox, registry = MemoryOutbox(), MemoryInbox(), CollectorRegistry()
    metrics = LinkMetrics(registry)
    listener = LinkListener(
        params=LinkParams(RECEIVER, chunk_bytes=CHUNK, window_bytes=window, keepalive_s=keepalive,
                          max_message_bytes=max_message), inbox=inbox,
        allow=lambda party: party == SENDER, metrics=metrics, retry_initial_s=0.001, retry_max_s=0.01)
    await carrier.listen("peer", 1, tls=None, handler=listener.handle)
    sender = LinkSender(
        peer=RECEIVER, params=LinkParams(SENDER, chunk_bytes=CHUNK, keepalive_s=keepalive), outbox=outbox,
        dial=carrier_dial(carrier.connect, "peer", 1, tls=None, server_hostname=None, timeout=1.0),
        backoff_initial_s=0.002, backoff_max_s=0.02, metrics=metrics, rng=random.Random(7), on_rejected=on_rejected)
    task = asyncio.create_task(sender.run())
    try:
        yield Rig(carrier, sender, listener, outbox, inbox, registry, metrics)
    finally:
        await sender.aclose(drain_timeout=1.0)
        task.cancel()


async def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


def message(i: int, size: int, topic: str) -> Envelope:
    return Envelope(message_id=f"m{i:05d}", session_id="s", topic=topic, src_party=SENDER, dst_party=RECEIVER,
                    payload=random.Random(i).randbytes(size))


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    delays = backoff_delays(0.2, 3.0, rng=random.Random(1))
    got = [next(delays) for _ in range(8)]
    caps = [0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0, 3.0]
    assert all(cap / 2 <= d <= cap for d, cap in zip(got, caps, strict=True))
    assert len(set(got)) == len(got)  # jittered, not in lock step


def test_peer_down_then_up_backs_off_reports_health_and_delivers() -> None:
    async def main() -> None:
        async with rig() as r:
            r.carrier.refuse = True
            await r.outbox.put(RECEIVER, message(1, 100, "t"))
            await wait_for(lambda: r.sender.statistics().reconnects >= 3)
            stats = r.sender.statistics()
            assert not stats.connected and "refused" in stats.last_error
            assert stats.outbox_depth == 1 and stats.oldest_age_s is not None
            reconnects = r.registry.get_sample_value("fedgate_link_reconnects_total", {"peer": RECEIVER})
            assert reconnects is not None and reconnects >= 3
            r.carrier.refuse = False
            await wait_for(lambda: r.outbox.acked == ["m00001"])
            await wait_for(lambda: r.sender.statistics().rtt is not None)
            stats = r.sender.statistics()
            assert stats.connected and stats.last_error == "" and stats.messages_acked == 1
            assert r.registry.get_sample_value("fedgate_link_connected", {"peer": RECEIVER}) == 1

    asyncio.run(main())


@pytest.mark.parametrize("seed", [20261127, 1, 2])
def test_chaos_every_message_exactly_once_in_order_per_topic(seed: int) -> None:
    """Random connection cuts and store-full spells while N messages of mixed sizes flow."""
    rng = random.Random(seed)

    async def main() -> None:
        async with rig() as r:
            msgs = [message(i, rng.choice([0, 10, 3000, CHUNK, 5 * CHUNK + 3, 20 * CHUNK]), f"t{rng.randrange(4)}")
                    for i in range(300)]

            async def producer() -> None:
                for m in msgs:
                    await r.outbox.put(RECEIVER, m)
                    if rng.random() < 0.1:
                        await asyncio.sleep(0.001)

            def done() -> bool:
                return len(r.outbox.acked) == len(msgs)

            async def chaos() -> None:
                while not done():
                    # Strike after a little progress (a few messages or chunks), whatever the speed.
                    count = len(r.inbox.order) + rng.randint(2, 20)
                    staged = r.inbox.appended_bytes + rng.randint(1, 8) * CHUNK

                    def progressed(count: int = count, staged: int = staged) -> bool:
                        return done() or len(r.inbox.order) >= count or r.inbox.appended_bytes >= staged

                    await wait_for(progressed)
                    fault = rng.random()
                    if fault < 0.4:
                        r.carrier.cut_all()
                    elif fault < 0.5:
                        r.inbox.full = True
                        await asyncio.sleep(0.01)
                        r.inbox.full = False

            async with asyncio.timeout(60):
                await asyncio.gather(producer(), chaos())
            assert r.sender.statistics().reconnects >= 5  # the faults really happened
            assert len(r.inbox.order) == len(set(r.inbox.order)) == len(msgs)
            for t in range(4):
                sent = [m for m in msgs if m.topic == f"t{t}"]
                got = r.inbox.queues[("s", f"t{t}")]
                assert [e.message_id for e in got] == [m.message_id for m in sent]
                assert all(e.payload == m.payload for e, m in zip(got, sent, strict=True))

    asyncio.run(main())


def test_graceful_close_drains_what_was_offered() -> None:
    async def main() -> None:
        async with rig() as r:
            for i in range(50):
                await r.outbox.put(RECEIVER, message(i, 2000, "t"))
            await wait_for(lambda: len(r.inbox.order) >= 1)
            await r.sender.aclose(drain_timeout=5.0)
            assert r.sender.statistics().state == "stopped"
            # Everything delivered was acknowledged: nothing stored is left for a resend.
            assert sorted(r.outbox.acked) == sorted(r.inbox.order)
            await wait_for(lambda: r.listener.statistics().connections == 0)

    asyncio.run(main())


def test_newer_connection_from_the_same_party_replaces_the_older() -> None:
    async def main() -> None:
        async with rig() as r:
            await r.outbox.put(RECEIVER, message(1, 10, "t"))
            await wait_for(lambda: r.outbox.acked == ["m00001"])
            second = LinkSender(
                peer=RECEIVER, params=LinkParams(SENDER, chunk_bytes=CHUNK), outbox=MemoryOutbox(),
                dial=carrier_dial(r.carrier.connect, "peer", 1, tls=None, server_hostname=None, timeout=1.0))
            task = asyncio.create_task(second.run())
            await wait_for(lambda: second.statistics().connected)
            await wait_for(lambda: r.listener.statistics().connections == 1)
            await wait_for(lambda: r.sender.statistics().reconnects >= 1)  # the first one was closed
            await second.aclose()
            task.cancel()

    asyncio.run(main())


def test_messages_the_peer_must_refuse_are_dead_lettered_not_retried_forever() -> None:
    dead: list[tuple[str, str]] = []

    async def on_rejected(item: OutboxItem, rejection: Rejection) -> None:
        dead.append((item.envelope.message_id, rejection.rule))

    async def main() -> None:
        async with rig(max_message=10_000, on_rejected=on_rejected) as r:
            await r.outbox.put(RECEIVER, message(1, 20_000, "t"))  # over the peer's HELLO limit
            long_id = Envelope(message_id="x" * 300, session_id="s", topic="t", src_party=SENDER,
                               dst_party=RECEIVER, payload=b"1")  # id over the frame limit
            await r.outbox.put(RECEIVER, long_id)
            await r.outbox.put(RECEIVER, message(2, 100, "t"))
            await wait_for(lambda: len(r.outbox.acked) == 3)
            assert r.inbox.order == ["m00002"]
            assert dead == [("m00001", "link-limits"), ("x" * 300, "link-limits")]
            assert r.sender.statistics().messages_rejected == 2 and r.sender.statistics().reconnects == 0

    asyncio.run(main())


def test_a_message_the_store_can_never_take_is_rejected_not_retried() -> None:
    async def main() -> None:
        async with rig() as r:
            r.inbox.max_message = 1000
            await r.outbox.put(RECEIVER, message(1, 5000, "t"))
            await r.outbox.put(RECEIVER, message(2, 500, "t"))
            await wait_for(lambda: len(r.outbox.acked) == 2)
            assert r.inbox.order == ["m00002"]
            assert r.sender.statistics().messages_rejected == 1 and r.sender.statistics().reconnects == 0

    asyncio.run(main())


def test_a_full_store_holds_back_without_the_link_timing_out() -> None:
    """Staging waits on the store in its own task: PINGs keep being answered while the store is full."""

    async def main() -> None:
        async with rig(keepalive=0.1) as r:  # a silent peer would be dead after 0.3 s
            await wait_for(lambda: r.sender.statistics().connected)
            r.inbox.full = True
            big = message(1, 12 * CHUNK, "t")
            await r.outbox.put(RECEIVER, big)
            await wait_for(lambda: r.inbox.full_refusals >= 20)
            await asyncio.sleep(1.0)  # more than three keepalive intervals with the store refusing
            assert r.sender.statistics().reconnects == 0 and r.outbox.acked == []
            r.inbox.full = False
            await wait_for(lambda: r.outbox.acked == ["m00001"])
            assert r.inbox.queues[("s", "t")][0].payload == big.payload
            assert r.sender.statistics().reconnects == 0

    asyncio.run(main())


def test_small_messages_of_one_topic_are_stored_in_batches_in_order() -> None:
    async def main() -> None:
        async with rig() as r:
            r.carrier.refuse = True  # let a backlog build up, then release it at once
            msgs = [message(i, 50, "t") for i in range(200)]
            for m in msgs:
                await r.outbox.put(RECEIVER, m)
            r.carrier.refuse = False
            await wait_for(lambda: len(r.outbox.acked) == len(msgs))
            assert r.inbox.order == [m.message_id for m in msgs]
            assert 1 <= r.inbox.batches < len(msgs) // 4  # many messages per store write

    asyncio.run(main())


def test_lost_staging_makes_the_receiver_rewind_the_sender_and_order_holds() -> None:
    """The sender remembers a resume point the store no longer has (staging dropped): RESUME, go-back-N."""

    async def main() -> None:
        async with rig() as r:
            big = message(1, 40 * CHUNK, "t")
            after = [message(i, 100, "t") for i in range(2, 6)]
            stage = r.inbox.append_partial
            cuts: list[int] = []

            async def stage_then_cut(mid: str, offset: int, chunk: bytes) -> None:
                await stage(mid, offset, chunk)
                if offset + len(chunk) == 10 * CHUNK and not cuts:  # the peer goes away with 10 chunks staged
                    cuts.append(offset)
                    r.carrier.refuse = True
                    r.carrier.cut_all()

            setattr(r.inbox, "append_partial", stage_then_cut)  # noqa: B010
            await r.outbox.put(RECEIVER, big)
            for m in after:
                await r.outbox.put(RECEIVER, m)
            await wait_for(lambda: r.carrier.refuse and r.sender.statistics().reconnects >= 1)
            await asyncio.sleep(0.05)  # let the receiver's staging task run dry
            r.inbox.partials.clear()  # e.g. the store pruned stale partials while the peer was away
            appended_before = r.inbox.appended_bytes
            r.carrier.refuse = False
            await wait_for(lambda: len(r.outbox.acked) == 5)
            assert r.inbox.order == [big.message_id] + [m.message_id for m in after]
            assert r.inbox.queues[("s", "t")][0].payload == big.payload
            assert r.inbox.appended_bytes - appended_before == big.size  # restaged from zero, once

    asyncio.run(main())


def test_two_lanes_of_one_party_run_side_by_side() -> None:
    # Lane 1 of the same party does not replace lane 0 (it would without lanes, see the test above).
    async def main() -> None:
        async with rig() as r:
            await r.outbox.put(RECEIVER, message(1, 10, "t"))
            await wait_for(lambda: r.outbox.acked == ["m00001"])
            lane1 = LinkSender(
                peer=RECEIVER, params=LinkParams(SENDER, chunk_bytes=CHUNK), outbox=MemoryOutbox(),
                dial=carrier_dial(r.carrier.connect, "peer", 1, tls=None, server_hostname=None, timeout=1.0), lane=1,
                metrics=r.metrics)
            task = asyncio.create_task(lane1.run())
            await wait_for(lambda: lane1.statistics().connected)
            await wait_for(lambda: r.listener.statistics().connections == 2)
            await asyncio.sleep(0.2)
            assert r.sender.statistics().reconnects == 0 and r.sender.statistics().connected
            assert r.listener.statistics().peers == (SENDER,)
            gauge = r.registry.get_sample_value("fedgate_link_inbound_connections", {"peer": SENDER})
            assert gauge == 2
            connected = r.registry.get_sample_value("fedgate_link_connected", {"peer": RECEIVER})
            assert connected == 2  # both lanes are counted; each one's close takes its own count back
            await lane1.aclose()
            task.cancel()
            await wait_for(lambda: r.registry.get_sample_value("fedgate_link_connected", {"peer": RECEIVER}) == 1)

    asyncio.run(main())


def test_a_lane_refuses_a_peer_without_lanes_and_keeps_its_messages() -> None:
    async def main() -> None:
        carrier = MemoryCarrier(client_party=SENDER, server_party=RECEIVER)
        inbox = MemoryInbox()
        old = LinkListener(params=LinkParams(RECEIVER, chunk_bytes=CHUNK, capabilities=frozenset({"resume", "credit"})),
                           inbox=inbox, allow=lambda party: party == SENDER)
        await carrier.listen("peer", 1, tls=None, handler=old.handle)
        outbox = MemoryOutbox()
        await outbox.put(RECEIVER, message(1, 10, "t"))
        lane1 = LinkSender(
            peer=RECEIVER, params=LinkParams(SENDER, chunk_bytes=CHUNK), outbox=outbox,
            dial=carrier_dial(carrier.connect, "peer", 1, tls=None, server_hostname=None, timeout=1.0),
            backoff_initial_s=0.01, backoff_max_s=0.05, lane=1)
        task = asyncio.create_task(lane1.run())
        await wait_for(lambda: "without lanes" in lane1.statistics().last_error)
        assert "link.lanes_per_peer = 1" in lane1.statistics().last_error
        await asyncio.sleep(0.1)
        assert outbox.acked == [] and await outbox.pending(RECEIVER, after_seq=0, limit=10)
        await lane1.aclose()
        task.cancel()

    asyncio.run(main())


def test_a_malformed_lane_in_hello_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with rig() as r:
            outbox = MemoryOutbox()
            await outbox.put(RECEIVER, message(7, 10, "t"))
            bad = LinkSender(
                peer=RECEIVER, params=LinkParams(SENDER, capabilities=frozenset({"resume", "lanes", "lane=99"})),
                outbox=outbox, backoff_initial_s=0.01, backoff_max_s=0.05,
                dial=carrier_dial(r.carrier.connect, "peer", 1, tls=None, server_hostname=None, timeout=1.0))
            task = asyncio.create_task(bad.run())
            await wait_for(lambda: bad.statistics().reconnects >= 2)
            assert "HELLO names lanes ['lane=99']: need one lane=N" in caplog.text
            assert outbox.acked == [] and "m00007" not in r.inbox.seen  # nothing passes a refused connection
            assert r.sender.statistics().reconnects == 0  # lane 0's link was not touched
            await bad.aclose()
            task.cancel()

    asyncio.run(main())
