"""The SQLite store: FIFO queues, long-poll pops, outbox, dedup, partial staging, quotas, crash safety."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from fedgate.config import StoreConfig
from fedgate.errors import MessageTooLargeError, ShuttingDownError, StoreFullError
from fedgate.proxy.envelope import Envelope, new_message_id
from fedgate.proxy.store import SqliteStore, outbox_of
from fedgate.proxy.store_api import Lane, lane_key


def env(topic: str = "t", payload: bytes = b"x", session: str = "s", dst: str = "10000") -> Envelope:
    return Envelope(message_id=new_message_id(), session_id=session, topic=topic, src_party="9999",
                    dst_party=dst, payload=payload, metadata={"x-ptp-trace-id": "1"})


async def open_store(tmp_path: pathlib.Path, **kw: object) -> SqliteStore:
    config = StoreConfig(path=tmp_path / "db" / "fedgate.db", min_free_bytes=0, **kw)  # type: ignore[arg-type]
    return await SqliteStore.open(config, max_message_bytes=64 * 1024 * 1024)


def test_fifo_per_session_and_topic(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        for i in range(5):
            await store.put(env("a", b"a%d" % i))
            await store.put(env("b", b"b%d" % i, session="other"))
        got = [(await store.pop_nowait("s", "a")) for _ in range(5)]
        assert [e.payload for e in got if e] == [b"a%d" % i for i in range(5)]
        assert await store.pop_nowait("s", "a") is None
        assert await store.pop_nowait("s", "b") is None  # other session
        peeked = await store.peek("other", "b")
        assert peeked is not None and peeked.payload == b"b0"
        assert got[0] is not None and got[0].metadata == {"x-ptp-trace-id": "1"}
        await store.aclose()

    asyncio.run(main())


def test_long_poll_pop_is_woken_by_put_and_times_out(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        waiters = [asyncio.create_task(store.pop("s", "t", timeout=30)) for _ in range(200)]
        await asyncio.sleep(0.05)
        assert store.statistics().parked_pops == 200
        for i in range(200):
            await store.put(env("t", b"%d" % i))
        got = await asyncio.gather(*waiters)
        assert sorted(int(e.payload) for e in got if e) == list(range(200))
        assert await store.pop("s", "t", timeout=0.05) is None
        assert store.statistics().parked_pops == 0
        await store.aclose()

    asyncio.run(main())


def test_cancelled_pop_puts_its_message_back(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        for i in range(3):
            await store.put(env("t", b"%d" % i))
        # Cancel pops at many points of their life; no message may be lost or reordered.
        for _ in range(20):
            task = asyncio.create_task(store.pop("s", "t", timeout=5))
            await asyncio.sleep(0)
            task.cancel()
            try:
                got = await task
            except asyncio.CancelledError:
                got = None
            if got is not None:
                await store.put(got)  # consumed: the test hands it back at the tail
        await asyncio.sleep(0.05)
        left = []
        while (e := await store.pop_nowait("s", "t")) is not None:
            left.append(e.payload)
        assert sorted(left) == [b"0", b"1", b"2"]
        await store.aclose()

    asyncio.run(main())


def test_release_session_and_topic_wakes_pops(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        await store.put(env("a"))
        await store.put(env("b"))
        await store.put(env("c", session="keep"))
        parked = asyncio.create_task(store.pop("s", "zzz", timeout=30))
        await asyncio.sleep(0.02)
        assert await store.release("s", "a") == 1
        assert await store.release("s") == 1
        with pytest.raises(LookupError):
            await parked
        assert (await store.peek("keep", "c")) is not None
        assert store.statistics().queued_messages == 1
        await store.aclose()

    asyncio.run(main())


def test_shutdown_fails_parked_pops(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        parked = asyncio.create_task(store.pop("s", "t", timeout=30))
        await asyncio.sleep(0.02)
        await store.release_waiters("stopping")
        with pytest.raises(ShuttingDownError):
            await parked
        await store.aclose()

    asyncio.run(main())


def test_quota_and_oversize_are_clear_errors_and_lose_nothing(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, max_bytes=1024 * 1024)
        await store.put(env("t", b"a" * 600_000))
        with pytest.raises(StoreFullError, match=r"store\.max_bytes"):
            await store.put(env("t", b"b" * 600_000))
        with pytest.raises(MessageTooLargeError):
            await store.deliver(env("t", b"c" * (65 * 1024 * 1024)))
        got = await store.pop_nowait("s", "t")
        assert got is not None and got.payload == b"a" * 600_000
        await store.put(env("t", b"b" * 600_000))  # room again
        await store.aclose()

    asyncio.run(main())


def test_outbox_ack_and_dedup(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        messages = [env("t", b"%d" % i) for i in range(4)]
        seqs = [await store.outbox_put("10000", m) for m in messages]
        assert seqs == sorted(seqs)
        items = await store.pending("10000", after_seq=0, limit=10)
        assert [i.envelope.message_id for i in items] == [m.message_id for m in messages]
        assert await store.wait_pending("10000", after_seq=seqs[-1], timeout=0.01) is False
        await store.ack("10000", [messages[0].message_id, messages[1].message_id, "unknown"])
        assert [i.seq for i in await store.pending("10000", after_seq=0, limit=10)] == seqs[2:]
        depth, oldest = await store.outbox_depth("10000")
        assert depth == 2 and oldest is not None
        # The receiving side: deliver twice, store once.
        assert await store.deliver(messages[0]) is True
        assert await store.deliver(messages[0]) is False
        assert store.statistics().queued_messages == 1
        await store.aclose()

    asyncio.run(main())


def test_outbox_lanes_split_a_peer_by_topic_and_keep_each_topics_order(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        topics = [f"topic-{i}" for i in range(12)]
        messages = [env(topics[i % 12], b"%d" % i) for i in range(60)]
        for m in messages:
            await store.outbox_put("10000", m)
        lanes = [outbox_of(store, Lane(i, 3)) for i in range(3)]
        seen: list[str] = []
        for index, view in enumerate(lanes):
            items = await view.pending("10000", after_seq=0, limit=100)
            assert items, "twelve topics over three lanes: every lane has some"
            assert all(lane_key(i.envelope.session_id, i.envelope.topic) % 3 == index for i in items)
            assert [i.seq for i in items] == sorted(i.seq for i in items)
            seen += [i.envelope.message_id for i in items]
            assert await view.outbox_depth("10000") == (60, (await store.outbox_depth("10000"))[1])
        assert sorted(seen) == sorted(m.message_id for m in messages)  # each message in exactly one lane
        # A put wakes the lane that owns it, not only the first waiter.
        after = (await store.pending("10000", after_seq=0, limit=100))[-1].seq
        owner = lane_key("s", "late") % 3
        waits = [asyncio.create_task(v.wait_pending("10000", after_seq=after, timeout=5)) for v in lanes]
        await asyncio.sleep(0.05)
        await store.outbox_put("10000", env("late"))
        assert await waits[owner] is True
        for task in waits:
            task.cancel()
        await store.aclose()

    asyncio.run(main())


def test_a_schema_1_store_gains_lanes_and_keeps_its_outbox(tmp_path: pathlib.Path) -> None:
    import sqlite3

    from fedgate.proxy.store import _encode_header

    path = tmp_path / "db" / "fedgate.db"
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, peer TEXT NOT NULL, message_id TEXT NOT NULL UNIQUE,
            enqueued REAL NOT NULL, header BLOB NOT NULL, payload BLOB NOT NULL);
        CREATE INDEX outbox_peer ON outbox (peer, seq);
    """)
    old = [env(f"t{i}", b"%d" % i) for i in range(8)]
    for m in old:
        conn.execute("INSERT INTO outbox (peer, message_id, enqueued, header, payload) VALUES (?, ?, 0, ?, ?)",
                     ("10000", m.message_id, _encode_header(m), m.payload))
    conn.close()

    async def main() -> None:
        store = await open_store(tmp_path)
        for index in range(2):
            items = await outbox_of(store, Lane(index, 2)).pending("10000", after_seq=0, limit=100)
            want = [m.message_id for m in old if lane_key(m.session_id, m.topic) % 2 == index]
            assert [i.envelope.message_id for i in items] == want
        await store.aclose()
        reopened = await open_store(tmp_path)  # now schema 2: opens without migrating again
        assert len(await reopened.pending("10000", after_seq=0, limit=100)) == 8
        await reopened.aclose()
        row = sqlite3.connect(str(path)).execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        assert row == ("2",)

    asyncio.run(main())


def test_partial_staging_resumes_at_offset(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        assert await store.partial_size("m") == 0
        await store.append_partial("m", 0, b"abc")
        await store.append_partial("m", 3, b"def")
        with pytest.raises(ValueError, match="offset 2"):
            await store.append_partial("m", 2, b"zz")
        assert await store.partial_size("m") == 6
        assert await store.take_partial("m") == b"abcdef"
        assert await store.partial_size("m") == 0
        await store.aclose()

    asyncio.run(main())


def test_acknowledged_messages_survive_kill_9(tmp_path: pathlib.Path) -> None:
    """A child process puts messages and reports each ack; we SIGKILL it; a new store has them all."""
    db = tmp_path / "crash.db"
    child = textwrap.dedent(f"""
        import asyncio, pathlib, sys
        from fedgate.config import StoreConfig
        from fedgate.proxy.envelope import Envelope
        from fedgate.proxy.store import SqliteStore, outbox_of
from fedgate.proxy.store_api import Lane, lane_key
        async def main():
            store = await SqliteStore.open(StoreConfig(path=pathlib.Path({str(db)!r}), min_free_bytes=0),
                                           max_message_bytes=1 << 20)
            i = 0
            while True:
                await store.put(Envelope(message_id=str(i), session_id="s", topic="t", src_party="1",
                                         dst_party="2", payload=b"%d" % i))
                print(i, flush=True)
                i += 1
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    async def check() -> None:
        store = await open_store(tmp_path / "unused")
        await store.aclose()
        store = await SqliteStore.open(StoreConfig(path=db, min_free_bytes=0), max_message_bytes=1 << 20)
        seen = []
        while (e := await store.pop_nowait("s", "t")) is not None:
            seen.append(int(e.payload))
        assert seen[: acked + 1] == list(range(acked + 1))
        await store.aclose()

    asyncio.run(check())


def test_handoff_to_a_parked_pop_keeps_order_and_survives_cancellation(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        for round_ in range(10):
            task = asyncio.create_task(store.pop("s", "t", timeout=30))
            await asyncio.sleep(0.01)  # parked on the empty queue
            first = env("t", b"first-%d" % round_)
            await store.put(first)  # handed straight to the parked pop
            await store.put(env("t", b"second-%d" % round_))  # stored: the queue is no longer "empty"
            task.cancel()  # before the pop could return its message
            try:
                got = await task
            except asyncio.CancelledError:
                got = None
            await asyncio.sleep(0.01)
            left = []
            while (e := await store.pop_nowait("s", "t")) is not None:
                left.append(e.payload)
            delivered = ([got.payload] if got else []) + left
            assert delivered == [b"first-%d" % round_, b"second-%d" % round_]  # once each, in order
        assert store.handoffs == 10
        assert store.statistics().queued_messages == 0
        await store.aclose()

    asyncio.run(main())


def test_handoffs_cancelled_together_all_go_back_in_order(tmp_path: pathlib.Path) -> None:
    # Three pops parked on one empty queue each get a hand-off; the client goes away and all three
    # are cancelled in the same loop turn. Every message must go back (the first put-back used to
    # take id 0 and the second collided with it: the message was lost), oldest at the head.
    async def main() -> None:
        store = await open_store(tmp_path)
        for round_ in range(3):
            tasks = [asyncio.create_task(store.pop("s", "t", timeout=30)) for _ in range(3)]
            while len(store._waiters.get(("s", "t"), ())) < 3:
                await asyncio.sleep(0.005)  # all three parked on the empty queue
            before = store.handoffs
            for i in range(3):
                await store.put(env("t", b"%d-%d" % (round_, i)))  # no await inside: the pops do not run
            assert store.handoffs == before + 3
            for task in reversed(tasks):  # cancellation order must not matter
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            await asyncio.sleep(0.05)
            left = []
            while (e := await store.pop_nowait("s", "t")) is not None:
                left.append(e.payload)
            assert left == [b"%d-%d" % (round_, i) for i in range(3)]
        assert store.statistics().queued_messages == 0
        assert not store._handoff_order
        await store.aclose()

    asyncio.run(main())


def test_handoffs_cancelled_as_the_store_closes_are_put_back_before_it_closes(tmp_path: pathlib.Path) -> None:
    # A gateway stop cancels parked pops and closes the store right after: the put-backs still in
    # flight must be written first (they used to fail with "store is closed" and the messages were lost).
    async def main() -> None:
        store = await open_store(tmp_path)
        tasks = [asyncio.create_task(store.pop("s", "t", timeout=30)) for _ in range(2)]
        while len(store._waiters.get(("s", "t"), ())) < 2:
            await asyncio.sleep(0.005)
        await store.put(env("t", b"a"))
        await store.put(env("t", b"b"))
        for task in tasks:
            task.cancel()
        while not all(task.done() for task in tasks):
            await asyncio.sleep(0)
        await store.aclose()  # at once: the put-backs are scheduled, not yet written
        store = await open_store(tmp_path)
        left = []
        while (e := await store.pop_nowait("s", "t")) is not None:
            left.append(e.payload)
        assert left == [b"a", b"b"]
        await store.aclose()

    asyncio.run(main())


def test_deliver_many_is_one_all_or_nothing_write_with_dedup(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, max_bytes=1024 * 1024)
        batch = [env("t", b"%d" % i) for i in range(5)]
        assert await store.deliver_many(batch[:3]) == [True, True, True]
        assert await store.deliver_many(batch) == [False, False, False, True, True]
        with pytest.raises(StoreFullError):
            await store.deliver_many([env("t", b"x" * 600_000), env("t", b"y" * 600_000)])
        got = []
        while (e := await store.pop_nowait("s", "t")) is not None:
            got.append(e.payload)
        assert got == [b"0", b"1", b"2", b"3", b"4"]  # in order, once each, nothing of the refused batch
        await store.aclose()

    asyncio.run(main())
