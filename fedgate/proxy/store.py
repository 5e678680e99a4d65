"""The embedded durable store: SQLite in WAL mode behind one writer thread.

Rules of this module:

1. Every statement runs on one dedicated thread (``_db``), in the order submitted. Operations that
   arrive while a batch is committing are grouped into the next transaction (group commit), each in
   its own SAVEPOINT so one failing operation does not abort its neighbours.
2. A coroutine that awaited a write has its data on disk (WAL, ``synchronous`` as configured) when
   it resumes: acknowledgements to clients and peers are sent only after that.
3. Payloads live in the database, never in Python memory beyond the message being handled, so
   memory stays bounded whatever the number and size of queued messages.
4. Disk full and quota errors become StoreFullError; nothing is dropped silently.

Tables: ``queue`` (local FIFO queues keyed by session and topic), ``outbox`` (messages waiting for a
peer gateway's acknowledgement, each with the lane key of its session and topic), ``seen`` (message
ids delivered, for deduplication) and ``partial`` (staged chunks of large inbound payloads, for
resume).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from fedgate.config import StoreConfig
from fedgate.errors import LocalError, MessageTooLargeError, ShuttingDownError, StoreFullError
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.store_api import Lane, OutboxItem, lane_key

__all__ = ["QueueStatistics", "SqliteStore"]

log = logging.getLogger("fedgate.store")

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

K_SCHEMA_VERSION = 2  # 2: outbox.lane (the lane key of a message's session and topic)
K_MAX_BLOB = 2**31 - 2  # bytes; SQLite's default SQLITE_MAX_LENGTH is 1e9, checked at open
K_DEDUP_RETENTION = 7 * 24 * 3600.0  # seconds a delivered message id is remembered

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL, topic TEXT NOT NULL, header BLOB NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS queue_key ON queue (session, topic, id);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, peer TEXT NOT NULL, message_id TEXT NOT NULL UNIQUE,
    enqueued REAL NOT NULL, header BLOB NOT NULL, payload BLOB NOT NULL, lane INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS outbox_peer ON outbox (peer, seq);
CREATE TABLE IF NOT EXISTS seen (message_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
CREATE TABLE IF NOT EXISTS partial (
    message_id TEXT NOT NULL, offset INTEGER NOT NULL, chunk BLOB NOT NULL, PRIMARY KEY (message_id, offset));
"""


def _encode_header(env: Envelope) -> bytes:
    return bytes(msgpack.packb(
        [
            env.message_id, env.session_id, env.topic, env.src_party, env.dst_party,
            env.src_role, env.dst_role, dict(env.metadata), env.protocol, env.created_at,
        ]
    ))


def _decode_header(header: bytes, payload: bytes) -> Envelope:
    (mid, session, topic, src, dst, src_role, dst_role, metadata, protocol, created) = msgpack.unpackb(header)
    return Envelope(
        message_id=mid, session_id=session, topic=topic, src_party=src, dst_party=dst, payload=payload,
        src_role=src_role, dst_role=dst_role, metadata=metadata, protocol=protocol, created_at=created,
    )


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: add ``outbox.lane`` and fill it from each waiting message's header, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(outbox)")}
        if "lane" not in columns:
            conn.execute("ALTER TABLE outbox ADD COLUMN lane INTEGER NOT NULL DEFAULT 0")
        rows = conn.execute("SELECT seq, header FROM outbox").fetchall()
        for seq, header in rows:
            _, session, topic, *_ = msgpack.unpackb(header)
            conn.execute("UPDATE outbox SET lane = ? WHERE seq = ?", (lane_key(session, topic), seq))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(K_SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """A snapshot of the store's contents."""

    queued_messages: int
    queued_bytes: int
    outbox_messages: int
    parked_pops: int


@dataclass(slots=True)
class _Pending:
    op: Op
    future: asyncio.Future[Any]


class SqliteStore:
    """Durable queues, outbox, dedup set and partial-payload staging in one SQLite database.

    Implements :class:`fedgate.proxy.store_api.Outbox` and :class:`~fedgate.proxy.store_api.Inbox`.
    Create with :meth:`open`; close with :meth:`aclose`.
    """

    def __init__(self, config: StoreConfig, *, max_message_bytes: int) -> None:
        self._config = config
        self._max_message = min(max_message_bytes, K_MAX_BLOB)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedgate-db")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Pending] = []
        self._flushing = False
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()  # the writer and put-backs (held until done)
        # Parked pops per queue; a waiter's future gets None (look in the table) or the Envelope itself.
        self._waiters: dict[tuple[str, str], collections.deque[asyncio.Future[Envelope | None]]] = {}
        # Messages stored or being stored per queue: a put hands its message straight to a parked pop
        # only when this is 0, which keeps FIFO order.
        self._depth: collections.Counter[tuple[str, str]] = collections.Counter()
        self.handoffs = 0
        self._handoff_seq = 0
        self._handoff_order: dict[int, int] = {}  # id(envelope) -> hand-off number, while a pop holds it
        self._requeues: list[tuple[int, Envelope]] = []  # hand-offs to put back, flushed once per loop turn
        self._outbox_events: dict[tuple[str, Lane | None], asyncio.Event] = {}  # per peer and lane (None: all)
        self._bytes = 0
        self._queued = 0
        self._outboxed = 0
        self._last_disk_check = 0.0
        self._disk_ok = True

    # -- life cycle -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, config: StoreConfig, *, max_message_bytes: int) -> SqliteStore:
        store = cls(config, max_message_bytes=max_message_bytes)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(store._executor, store._open_sync)
        return store

    def _open_sync(self) -> None:
        path = self._config.path
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._config.synchronous.upper()}")
        conn.execute("PRAGMA busy_timeout=5000")
        # Large blobs: read through the page cache by mmap, checkpoint the WAL in larger steps.
        conn.execute("PRAGMA mmap_size=268435456")
        conn.execute("PRAGMA wal_autocheckpoint=16384")
        conn.execute("PRAGMA journal_size_limit=268435456")
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(K_SCHEMA_VERSION),))
        elif int(row[0]) == 1:
            _migrate_1_to_2(conn)
            log.info("store schema migrated", extra={"fields": {"path": str(path), "from": 1, "to": 2}})
        elif int(row[0]) != K_SCHEMA_VERSION:
            raise LocalError(f"{path}: store schema {row[0]} is not the supported {K_SCHEMA_VERSION}")
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
        self._max_message = min(self._max_message, limit - 1024)
        self._bytes = sum(
            conn.execute(f"SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM {table}").fetchone()[0]
            for table in ("queue", "outbox")
        )
        self._queued = conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
        for session, topic, count in conn.execute("SELECT session, topic, COUNT(*) FROM queue GROUP BY 1, 2"):
            self._depth[(session, topic)] = count
        self._outboxed = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._conn = conn
        log.info("store opened", extra={"fields": {"path": str(path), "queued": self._queued,
                                                    "outbox": self._outboxed, "bytes": self._bytes}})

    async def aclose(self) -> None:
        if self._closed:
            return
        # The writer and the put-backs of cancelled pops finish before the store closes (asyncio.wait,
        # unlike gather, never cancels them); no await between the last wait and _closed, so nothing
        # new is pending then.
        while self._background:
            await asyncio.wait(set(self._background))
        self._closed = True
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.cancel()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None

    # -- the writer -------------------------------------------------------------------------------

    async def _run(self, op: Op) -> Any:
        if self._closed:
            raise LocalError("store is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(op, fut))
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush())
        return await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if self._config.commit_interval_s:
                    await asyncio.sleep(self._config.commit_interval_s)
                batch, self._pending = self._pending, []
                try:
                    results = await loop.run_in_executor(self._executor, self._run_batch, [p.op for p in batch])
                except BaseException as exc:  # the commit itself failed: every op of the batch fails
                    err = _translate(exc)
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(err)
                    continue
                for p, (ok, value) in zip(batch, results):
                    if p.future.done():
                        continue
                    if ok:
                        p.future.set_result(value)
                    else:
                        p.future.set_exception(value)
        finally:
            self._flushing = False

    def _run_batch(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, _translate(exc)))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    # -- admission ----------------------------------------------------------------------------------

    def _admit(self, size: int) -> None:
        if size > self._max_message:
            raise MessageTooLargeError(f"message of {size} bytes exceeds the limit of {self._max_message} bytes")
        if self._bytes + size > self._config.max_bytes:
            raise StoreFullError(
                f"store quota reached: {self._bytes} of {self._config.max_bytes} bytes queued "
                f"(store.max_bytes); pop or release queues, or raise the quota"
            )
        now = time.monotonic()
        if now - self._last_disk_check > 0.25 or not self._disk_ok:
            self._last_disk_check = now
            free = shutil.disk_usage(self._config.path.parent).free
            self._disk_ok = free - size >= self._config.min_free_bytes
        if not self._disk_ok:
            raise StoreFullError(
                f"disk nearly full at {self._config.path.parent}: less than store.min_free_bytes="
                f"{self._config.min_free_bytes} would remain"
            )

    # -- local queues -------------------------------------------------------------------------------

    async def put(self, envelope: Envelope) -> None:
        """Append to the local queue (session, topic); durable when this returns.

        When a pop is parked on an empty queue the message is handed to it directly: the same
        outcome as storing and popping it, without the two writes.
        """
        self._admit(envelope.size)
        key = (envelope.session_id, envelope.topic)
        if self._handoff(key, envelope):
            return
        header = _encode_header(envelope)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO queue (session, topic, header, payload) VALUES (?, ?, ?, ?)",
                (envelope.session_id, envelope.topic, header, envelope.payload),
            )

        await self._stored(key, envelope, op)

    async def _stored(self, key: tuple[str, str], envelope: Envelope, op: Op) -> Any:
        self._depth[key] += 1  # before the write: later puts must queue behind this one
        try:
            result = await self._run(op)
        except BaseException:
            self._undepth(key)
            raise
        if result is False:  # a duplicate: nothing was stored
            self._undepth(key)
            return result
        self._bytes += envelope.size
        self._queued += 1
        self._wake(key)
        return result

    def _undepth(self, key: tuple[str, str], count: int = 1) -> None:
        self._depth[key] -= count
        if self._depth[key] <= 0:
            del self._depth[key]

    def _idle_waiter(self, key: tuple[str, str]) -> asyncio.Future[Envelope | None] | None:
        for fut in self._waiters.get(key, ()):
            if not fut.done():
                return fut
        return None

    def _handoff(self, key: tuple[str, str], envelope: Envelope) -> bool:
        if self._depth.get(key, 0):
            return False
        fut = self._idle_waiter(key)
        if fut is None:
            return False
        fut.set_result(envelope)
        self.handoffs += 1
        self._handoff_seq += 1
        self._handoff_order[id(envelope)] = self._handoff_seq
        return True

    def _wake(self, key: tuple[str, str]) -> None:
        fut = self._idle_waiter(key)
        if fut is not None:
            fut.set_result(None)

    def _requeue_head(self, envelope: Envelope) -> None:
        """A handed-off message whose pop did not return it goes back to the head of its queue.

        Several pops of one queue can each hold a hand-off when they are cancelled together (a
        client going away): the put-backs of one loop turn are written in one operation, oldest
        hand-off at the head, so the queue keeps the order the messages arrived in.
        """
        key = (envelope.session_id, envelope.topic)
        self._depth[key] += 1
        self._requeues.append((self._handoff_order.pop(id(envelope), 0), envelope))
        if len(self._requeues) == 1:
            self._spawn(self._flush_requeues())

    async def _flush_requeues(self) -> None:
        await asyncio.sleep(0)  # let the other pops cancelled in this turn add theirs
        batch, self._requeues = sorted(self._requeues, key=lambda item: item[0], reverse=True), []
        rows = [(_encode_header(e), e) for _, e in batch]

        def op(conn: sqlite3.Connection) -> None:
            first = conn.execute("SELECT MIN(id) FROM queue").fetchone()[0]
            head = first if first is not None else 1
            conn.executemany(  # newest first, each in front of the last: the oldest ends at the head
                "INSERT INTO queue (id, session, topic, header, payload) VALUES (?, ?, ?, ?, ?)",
                [(head - 1 - i, e.session_id, e.topic, header, e.payload) for i, (header, e) in enumerate(rows)],
            )

        try:
            await self._run(op)
        except Exception:
            for _, e in batch:
                self._undepth((e.session_id, e.topic))
            log.exception("could not put back handed-off messages", extra={"fields": {"count": len(batch)}})
            return
        for _, e in batch:
            self._bytes += e.size
            self._queued += 1
            self._wake((e.session_id, e.topic))

    async def pop_nowait(self, session: str, topic: str) -> Envelope | None:
        """Remove and return the oldest message of the queue, or None if it is empty.

        If the caller is cancelled after the message left the queue, it is put back at the head.
        """

        def op(conn: sqlite3.Connection) -> tuple[int, bytes, bytes] | None:
            row = conn.execute(
                "SELECT id, header, payload FROM queue WHERE session = ? AND topic = ? ORDER BY id LIMIT 1",
                (session, topic),
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM queue WHERE id = ?", (row[0],))
            return int(row[0]), row[1], row[2]

        task = asyncio.ensure_future(self._run(op))
        try:
            got = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._restore_later(t, session, topic))
            raise
        if got is None:
            return None
        env = _decode_header(got[1], got[2])
        self._bytes -= env.size
        self._queued -= 1
        self._undepth((session, topic))
        return env

    def _restore_later(self, task: asyncio.Future[Any], session: str, topic: str) -> None:
        if task.cancelled() or task.exception() is not None or task.result() is None:
            return
        row_id, header, payload = task.result()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO queue (id, session, topic, header, payload) VALUES (?, ?, ?, ?, ?)",
                (row_id, session, topic, header, payload),
            )

        async def restore() -> None:
            self._depth[(session, topic)] += 1
            try:
                await self._run(op)
            except Exception:
                self._undepth((session, topic))
                log.exception("could not put back a message of a cancelled pop",
                              extra={"fields": {"session": session, "topic": topic}})
                return
            self._bytes += len(payload)
            self._queued += 1
            self._wake((session, topic))

        self._spawn(restore())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def pop(self, session: str, topic: str, *, timeout: float) -> Envelope | None:
        """Long-poll pop: the oldest message, waiting up to ``timeout`` seconds; None on expiry."""
        key = (session, topic)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            fut: asyncio.Future[Envelope | None] = loop.create_future()
            waiters = self._waiters.setdefault(key, collections.deque())
            waiters.append(fut)
            got: Envelope | None = None
            try:
                got = await self.pop_nowait(session, topic)
                if got is not None:
                    return got
                remaining = deadline - loop.time()
                if remaining <= 0 and not fut.done():
                    return None
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
                    # arrives after the hand-off and returns the message to a caller that is gone
                    async with asyncio.timeout(max(remaining, 0.0)):
                        got = await fut
                except TimeoutError:
                    return None
                if got is not None:  # handed over by a put
                    return got
            finally:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[key]
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    result = fut.result()
                    if result is not None and result is got:
                        self._handoff_order.pop(id(result), None)
                    if result is None and got is None:
                        self._wake(key)  # a wake-up this pop did not use goes to the next one
                    elif result is not None and result is not got:
                        self._requeue_head(result)  # handed over, but this pop is not returning it

    async def peek(self, session: str, topic: str) -> Envelope | None:
        """The oldest message of the queue without removing it."""

        def op(conn: sqlite3.Connection) -> tuple[bytes, bytes] | None:
            row = conn.execute(
                "SELECT header, payload FROM queue WHERE session = ? AND topic = ? ORDER BY id LIMIT 1",
                (session, topic),
            ).fetchone()
            return None if row is None else (row[0], row[1])

        got = await self._run(op)
        return None if got is None else _decode_header(*got)

    async def release(self, session: str, topic: str = "") -> int:
        """Drop one queue, or every queue of the session when ``topic`` is empty; wake their pops."""

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            where, args = ("session = ?", (session,)) if not topic else ("session = ? AND topic = ?", (session, topic))
            size = conn.execute(
                f"SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM queue WHERE {where}", args
            ).fetchone()[0]
            count = conn.execute(f"DELETE FROM queue WHERE {where}", args).rowcount
            return count, size

        count, size = await self._run(op)
        self._bytes -= size
        self._queued -= count
        for key in [k for k in self._depth if k[0] == session and (not topic or k[1] == topic)]:
            del self._depth[key]
        for key, waiters in list(self._waiters.items()):
            if key[0] == session and (not topic or key[1] == topic):
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(LookupError(f"queue {key[1]!r} of session {session!r} was released"))
        return int(count)

    async def release_waiters(self, reason: str) -> None:
        """Fail every parked pop with ShuttingDownError (used when the gateway stops)."""
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(ShuttingDownError(reason))

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            queued_messages=self._queued, queued_bytes=self._bytes, outbox_messages=self._outboxed,
            parked_pops=sum(len(w) for w in self._waiters.values()),
        )

    # -- Inbox (link receiver) -----------------------------------------------------------------------

    async def deliver(self, envelope: Envelope) -> bool:
        self._admit(envelope.size)
        key = (envelope.session_id, envelope.topic)
        header = _encode_header(envelope)
        now = time.time()
        if self._idle_waiter(key) is not None and not self._depth.get(key, 0):
            # A pop is parked on the empty queue: record the id, then hand the message over.
            def remember(conn: sqlite3.Connection) -> bool:
                cur = conn.execute("INSERT OR IGNORE INTO seen (message_id, at) VALUES (?, ?)",
                                   (envelope.message_id, now))
                conn.execute("DELETE FROM partial WHERE message_id = ?", (envelope.message_id,))
                return cur.rowcount == 1

            if not await self._run(remember):
                return False
            if self._handoff(key, envelope):
                return True
            # The pop went away meanwhile: store it. (A crash between the two commits would lose it;
            # the window is one writer round trip, and only when a pop vanished in it.)

            def store(conn: sqlite3.Connection) -> bool:
                conn.execute(
                    "INSERT INTO queue (session, topic, header, payload) VALUES (?, ?, ?, ?)",
                    (envelope.session_id, envelope.topic, header, envelope.payload),
                )
                return True

            await self._stored(key, envelope, store)
            return True

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("INSERT OR IGNORE INTO seen (message_id, at) VALUES (?, ?)", (envelope.message_id, now))
            if cur.rowcount == 0:
                return False
            conn.execute(
                "INSERT INTO queue (session, topic, header, payload) VALUES (?, ?, ?, ?)",
                (envelope.session_id, envelope.topic, header, envelope.payload),
            )
            conn.execute("DELETE FROM partial WHERE message_id = ?", (envelope.message_id,))
            return True

        fresh: bool = await self._stored(key, envelope, op)
        return fresh

    async def deliver_many(self, envelopes: list[Envelope]) -> list[bool]:
        """:meth:`deliver` for each, in order, in one transaction: all stored or none.

        Returns, per envelope, True if stored now and False for a duplicate.
        """
        for envelope in envelopes:
            self._admit(envelope.size)
        if sum(e.size for e in envelopes) + self._bytes > self._config.max_bytes:
            raise StoreFullError(f"store quota reached: {self._bytes} of {self._config.max_bytes} bytes queued "
                                 f"(store.max_bytes)")
        rows = [(e, _encode_header(e)) for e in envelopes]
        now = time.time()

        def op(conn: sqlite3.Connection) -> list[bool]:
            fresh = []
            for envelope, header in rows:
                cur = conn.execute("INSERT OR IGNORE INTO seen (message_id, at) VALUES (?, ?)",
                                   (envelope.message_id, now))
                if cur.rowcount == 0:
                    fresh.append(False)
                    continue
                conn.execute(
                    "INSERT INTO queue (session, topic, header, payload) VALUES (?, ?, ?, ?)",
                    (envelope.session_id, envelope.topic, header, envelope.payload),
                )
                conn.execute("DELETE FROM partial WHERE message_id = ?", (envelope.message_id,))
                fresh.append(True)
            return fresh

        keys = [(e.session_id, e.topic) for e in envelopes]
        for key in keys:
            self._depth[key] += 1  # before the write: later puts must queue behind these
        try:
            fresh: list[bool] = await self._run(op)
        except BaseException:
            for key in keys:
                self._undepth(key)
            raise
        for envelope, key, stored in zip(envelopes, keys, fresh):
            if stored:
                self._bytes += envelope.size
                self._queued += 1
                self._wake(key)
            else:
                self._undepth(key)
        return fresh

    async def seen(self, message_id: str) -> bool:
        """Whether ``message_id`` was already delivered here."""

        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("SELECT 1 FROM seen WHERE message_id = ?", (message_id,)).fetchone() is not None

        return bool(await self._run(op))

    async def partial_size(self, message_id: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute(
                "SELECT COALESCE(SUM(LENGTH(chunk)), 0) FROM partial WHERE message_id = ?", (message_id,)
            ).fetchone()[0])

        return int(await self._run(op))

    async def append_partial(self, message_id: str, offset: int, chunk: bytes) -> None:
        self._admit(len(chunk))

        def op(conn: sqlite3.Connection) -> None:
            have = conn.execute(
                "SELECT COALESCE(SUM(LENGTH(chunk)), 0) FROM partial WHERE message_id = ?", (message_id,)
            ).fetchone()[0]
            if have != offset:
                raise ValueError(f"chunk of {message_id} at offset {offset}, but {have} bytes are staged")
            conn.execute("INSERT INTO partial VALUES (?, ?, ?)", (message_id, offset, chunk))

        await self._run(op)

    async def take_partial(self, message_id: str) -> bytes:
        def op(conn: sqlite3.Connection) -> bytes:
            rows = conn.execute(
                "SELECT chunk FROM partial WHERE message_id = ? ORDER BY offset", (message_id,)
            ).fetchall()
            conn.execute("DELETE FROM partial WHERE message_id = ?", (message_id,))
            return b"".join(r[0] for r in rows)

        return bytes(await self._run(op))

    async def prune_seen(self, *, older_than: float = K_DEDUP_RETENTION) -> int:
        cutoff = time.time() - older_than

        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute("DELETE FROM seen WHERE at < ?", (cutoff,)).rowcount)

        return int(await self._run(op))

    # -- Outbox (link sender) ------------------------------------------------------------------------

    async def outbox_put(self, peer: str, envelope: Envelope) -> int:
        """Append to the outbox for ``peer``; durable when this returns; returns the seq."""
        self._admit(envelope.size)
        header = _encode_header(envelope)
        now = time.time()
        key = lane_key(envelope.session_id, envelope.topic)

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO outbox (peer, message_id, enqueued, header, payload, lane) VALUES (?, ?, ?, ?, ?, ?)",
                (peer, envelope.message_id, now, header, envelope.payload, key),
            )
            return int(cur.lastrowid or 0)

        seq: int = await self._run(op)
        self._bytes += envelope.size
        self._outboxed += 1
        for (who, lane), event in self._outbox_events.items():
            if who == peer and (lane is None or lane.owns(key)):
                event.set()
        return seq

    def _outbox_event(self, peer: str, lane: Lane | None) -> asyncio.Event:
        event = self._outbox_events.get((peer, lane))
        if event is None:
            event = self._outbox_events[(peer, lane)] = asyncio.Event()
        return event

    async def pending(self, peer: str, *, after_seq: int, limit: int, lane: Lane | None = None) -> list[OutboxItem]:
        """Unacknowledged items for ``peer`` after ``after_seq`` in seq order; only ``lane``'s when given."""
        where, args = _lane_filter(lane)

        def op(conn: sqlite3.Connection) -> list[tuple[int, float, bytes, bytes]]:
            return conn.execute(
                "SELECT seq, enqueued, header, payload FROM outbox"
                f" WHERE peer = ? AND seq > ?{where} ORDER BY seq LIMIT ?",
                (peer, after_seq, *args, limit),
            ).fetchall()

        rows = await self._run(op)
        return [OutboxItem(seq=s, peer=peer, envelope=_decode_header(h, p), enqueued_at=t) for s, t, h, p in rows]

    async def wait_pending(self, peer: str, *, after_seq: int, timeout: float, lane: Lane | None = None) -> bool:
        event = self._outbox_event(peer, lane)
        event.clear()
        where, args = _lane_filter(lane)

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                f"SELECT 1 FROM outbox WHERE peer = ? AND seq > ?{where} LIMIT 1", (peer, after_seq, *args)
            ).fetchone()
            return row is not None

        if await self._run(op):
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def ack(self, peer: str, message_ids: list[str]) -> None:
        if not message_ids:
            return

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            size = count = 0
            for mid in message_ids:
                row = conn.execute(
                    "SELECT LENGTH(payload) FROM outbox WHERE peer = ? AND message_id = ?", (peer, mid)
                ).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM outbox WHERE peer = ? AND message_id = ?", (peer, mid))
                    size += row[0]
                    count += 1
            return count, size

        count, size = await self._run(op)
        self._bytes -= size
        self._outboxed -= count

    async def outbox_depth(self, peer: str) -> tuple[int, float | None]:
        """Messages waiting for ``peer`` and the enqueue time of the oldest (None when empty)."""

        def op(conn: sqlite3.Connection) -> tuple[int, float | None]:
            row = conn.execute("SELECT COUNT(*), MIN(enqueued) FROM outbox WHERE peer = ?", (peer,)).fetchone()
            return int(row[0]), row[1]

        depth, oldest = await self._run(op)
        return depth, oldest

    async def outbox_peers(self) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            return [r[0] for r in conn.execute("SELECT DISTINCT peer FROM outbox").fetchall()]

        return list(await self._run(op))


def _lane_filter(lane: Lane | None) -> tuple[str, tuple[int, ...]]:
    if lane is None or lane.count == 1:
        return "", ()
    return " AND lane % ? = ?", (lane.count, lane.index)


class _OutboxView:
    """Adapts :class:`SqliteStore` to the :class:`~fedgate.proxy.store_api.Outbox` protocol.

    With ``lane``, ``pending`` and ``wait_pending`` see only that lane's messages; ``outbox_depth``
    still counts the whole peer's (its metric is per peer).
    """

    def __init__(self, store: SqliteStore, lane: Lane | None = None) -> None:
        self._store = store
        self._lane = lane

    async def put(self, peer: str, envelope: Envelope) -> int:
        return await self._store.outbox_put(peer, envelope)

    async def pending(self, peer: str, *, after_seq: int, limit: int) -> list[OutboxItem]:
        return await self._store.pending(peer, after_seq=after_seq, limit=limit, lane=self._lane)

    async def wait_pending(self, peer: str, *, after_seq: int, timeout: float) -> bool:
        return await self._store.wait_pending(peer, after_seq=after_seq, timeout=timeout, lane=self._lane)

    async def ack(self, peer: str, message_ids: list[str]) -> None:
        await self._store.ack(peer, message_ids)

    async def outbox_depth(self, peer: str) -> tuple[int, float | None]:
        return await self._store.outbox_depth(peer)


def outbox_of(store: SqliteStore, lane: Lane | None = None) -> _OutboxView:
    """The store seen as an Outbox (of one lane's messages when ``lane`` is given)."""
    return _OutboxView(store, lane)


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "full" in text or "disk I/O" in text:
            return StoreFullError(f"store write failed: {text}")
        return LocalError(f"store error: {text}")
    if isinstance(exc, sqlite3.DataError | sqlite3.IntegrityError) and "too big" in str(exc):
        return MessageTooLargeError(str(exc))
    if isinstance(exc, sqlite3.Error):
        return LocalError(f"store error: {exc}")
    return exc
