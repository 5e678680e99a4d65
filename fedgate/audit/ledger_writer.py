"""The ledger's asyncio adapter: a bounded queue in front of one writer task and one SQLite thread.

Rules of this module:

1. Callers on the event loop never touch SQLite: :meth:`LedgerWriter.record` queues the record
   (its record is built and hashed later, on the writer thread); :meth:`run` drains the
   queue in batches of up to ``batch`` records (waiting ``commit_interval_s`` after the first one
   for more: one transaction per message would cost more than the audit) and hands each batch to a
   dedicated thread, which
   hashes, chains (pure core), signs when due and writes it in one transaction. The chain head
   advances only when the transaction committed.
2. Backpressure is explicit: the queue holds ``queue_size`` records; :meth:`append` waits for room,
   :meth:`record` / :meth:`append_nowait` raise :class:`~fedgate.errors.StoreFullError` when full
   (the front then fails the push with RESOURCE_EXHAUSTED: a message is never passed unrecorded).
3. A signed checkpoint is written with the batch that completes ``checkpoint_every`` entries, when
   ``checkpoint_interval_s`` passed with unsigned entries, and on :meth:`aclose`.
4. A failed SQLite write ends :meth:`run` with the exception (the task group sees it); nothing is
   retried silently. A cancelled :meth:`run` never drops a batch it handed to the thread, even one
   the thread had not started yet: the thread writes it and :meth:`aclose` waits for it.
5. Durability for acknowledgements: :meth:`synced` waits until every record queued before the call
   is committed (group commit: a waiting caller cuts the ``commit_interval_s`` gathering short, and
   the records that arrive while one transaction commits share the next). With ``[audit]
   ledger_ack_after_commit`` the gateway awaits it before it acknowledges a message. Committed means
   in the WAL: it survives a crash of the process; with ``ledger_synchronous = "full"`` a power loss
   too. Without it, the guarantee is :meth:`record`'s: queued before the message moves on, committed
   within ``commit_interval_s`` (plus one write), all of it on a clean :meth:`aclose`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedgate.audit.config import AuditConfig
from fedgate.audit.keys import load_signing_key
from fedgate.audit.ledger_core import HashChain, LedgerEntry, LedgerRecord, record_for, sign_checkpoint
from fedgate.audit.ledger_store import LedgerStore
from fedgate.errors import LocalError, StoreFullError
from fedgate.proxy.envelope import Envelope

__all__ = ["LedgerWriter"]

log = logging.getLogger("fedgate.audit")

K_HASH_IN_WRITER = 0  # bytes; payloads of this size or more are hashed on the writer thread (all of them)
K_MAX_UNHASHED = 256 * 1024 * 1024  # bytes of payload held for hashing at once; beyond, hash at once


class _Unhashed(NamedTuple):
    """What :func:`record_for` needs; the writer thread builds the record and hashes the payload (the
    envelope, immutable, is held until then)."""

    envelope: Envelope
    direction: str
    verdict: str
    rule: str
    now: float


_Item = LedgerRecord | _Unhashed


class LedgerWriter:
    """Append audited messages to the ledger from asyncio code."""

    def __init__(
        self,
        store: LedgerStore,
        key: Ed25519PrivateKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 60.0,
        queue_size: int = 65536,
        batch: int = 512,
        commit_interval_s: float = 0.05,
    ) -> None:
        self._store = store
        self._key = key
        self._every = checkpoint_every
        self._interval = checkpoint_interval_s
        self._batch = batch
        self._commit_interval = commit_interval_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(queue_size)
        self._taken: list[_Item] = []  # taken from the queue, not yet handed to the writer thread
        self._unhashed = 0  # payload bytes queued for hashing on the writer thread
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fedgate-ledger")
        self._chain: HashChain | None = None
        self._unsigned = 0
        self._last_checkpoint = 0.0
        self._recorded = 0  # records queued so far (numbered in queue order)
        self._durable = 0  # records committed so far (always a prefix of the queued ones)
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._hurry = asyncio.Event()  # set by synced(): stop gathering, commit now
        self._failed: BaseException | None = None
        self._in_flight: asyncio.Future[None] | None = None  # the last batch handed to the writer thread
        self.written = 0
        """Entries written by this writer."""

    @classmethod
    def from_config(cls, config: AuditConfig) -> LedgerWriter:
        """Open the ledger file and the signing key named by the config (blocking; call at start-up)."""
        key = load_signing_key(config.signing_key, create=config.create_signing_key)
        store = LedgerStore(config.ledger_path, synchronous=config.ledger_synchronous)
        return cls(
            store,
            key,
            checkpoint_every=config.checkpoint_every,
            checkpoint_interval_s=config.checkpoint_interval_s,
            queue_size=config.ledger_queue,
            batch=config.ledger_batch,
            commit_interval_s=config.ledger_commit_interval_s,
        )

    def record(self, envelope: Envelope, direction: str, verdict: str, rule: str, *, now: float) -> None:
        """Queue the record of one audited message; StoreFullError when the queue is full.

        The record is built and its payload hashed on the writer thread, in the batch (hashlib releases
        the GIL for large payloads; a batch of small ones is cheaper there than one by one between the
        event loop's other work), up to ``K_MAX_UNHASHED`` payload bytes held at once; beyond, here.
        """
        size = envelope.size
        if size >= K_HASH_IN_WRITER and self._unhashed + size <= K_MAX_UNHASHED:
            self._put(_Unhashed(envelope, direction, verdict, rule, now))
            self._unhashed += size
        else:
            self._put(record_for(envelope, direction, verdict, rule, now=now))

    def append_nowait(self, record: LedgerRecord) -> None:
        self._put(record)

    def _put(self, item: _Item) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull as exc:
            raise StoreFullError(f"audit ledger queue is full ({self._queue.maxsize} records)") from exc
        self._recorded += 1

    async def append(self, record: LedgerRecord) -> None:
        """Queue a record, waiting while the queue is full."""
        await self._queue.put(record)
        self._recorded += 1

    async def synced(self) -> None:
        """Wait until every record queued so far is committed (rule 5; needs :meth:`run` running).

        Raises :class:`~fedgate.errors.LocalError` when the write failed (the writer is down).
        """
        if self._failed is not None:
            raise LocalError(f"audit ledger write failed: {self._failed}")
        target = self._recorded
        if self._durable >= target:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        self._hurry.set()
        await future

    def _committed(self, count: int) -> None:
        """``count`` more records are committed: wake the callers of :meth:`synced` they satisfy."""
        self._durable += count
        waiters = self._waiters
        while waiters and waiters[0][0] <= self._durable:
            future = waiters.popleft()[1]
            if not future.done():
                future.set_result(None)

    def _fail_waiters(self, exc: BaseException) -> None:
        self._failed = exc
        while self._waiters:
            future = self._waiters.popleft()[1]
            if not future.done():
                future.set_exception(LocalError(f"audit ledger write failed: {exc}"))

    async def flush(self) -> None:
        """Wait until every record queued so far is written (needs :meth:`run` running)."""
        await self._queue.join()

    async def run(self) -> None:
        """The writer task: run it in the gateway's task group until cancelled."""
        await self._load_head()
        while True:
            timeout = max(0.0, self._last_checkpoint + self._interval - time.monotonic())
            try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (the stop)
                async with asyncio.timeout(timeout if self._unsigned else None):
                    first = await self._queue.get()
            except TimeoutError:
                await self._write([], force_checkpoint=True)
                continue
            self._taken.append(first)
            count = 1
            try:
                if self._commit_interval and not self._waiters and self._queue.qsize() < self._batch - 1:
                    # gather more records into one transaction, unless a caller waits for them (rule 5)
                    self._hurry.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._commit_interval):
                            await self._hurry.wait()
                while count < self._batch and not self._queue.empty():
                    self._taken.append(self._queue.get_nowait())
                    count += 1
                due = time.monotonic() - self._last_checkpoint >= self._interval
                await self._write(self._take(), force_checkpoint=due)
            finally:
                for _ in range(count):
                    self._queue.task_done()

    def _take(self) -> list[_Item]:
        """Hand the taken records over (to the writer thread); aclose() writes any left behind."""
        items, self._taken = self._taken, []
        return items

    async def _load_head(self) -> None:
        if self._chain is None:
            seq, head = await asyncio.get_running_loop().run_in_executor(self._executor, self._store.head)
            self._chain = HashChain(seq=seq, head=head)
            self._last_checkpoint = time.monotonic()

    async def _write(self, items: list[_Item], *, force_checkpoint: bool) -> None:
        job = asyncio.get_running_loop().run_in_executor(self._executor, self._write_sync, items, force_checkpoint)
        self._in_flight = job
        try:
            # Shielded: cancelling the awaiting task must not cancel the job, or a batch the thread had not
            # yet picked up (a busy thread, or one that had not woken yet) would be dropped unwritten.
            await asyncio.shield(job)
        except asyncio.CancelledError:
            raise  # the thread writes the batch; aclose() waits for it, then writes what was not taken
        except BaseException as exc:
            self._fail_waiters(exc)
            raise
        finally:
            self._unhashed -= sum(i.envelope.size for i in items if type(i) is _Unhashed)
        self._committed(len(items))

    def _write_sync(self, items: list[_Item], force_checkpoint: bool) -> None:
        """On the writer thread: hash what is unhashed, chain, sign when due, write one transaction."""
        assert self._chain is not None
        chain = HashChain(seq=self._chain.seq, head=self._chain.head)  # adopted only once written
        entries: list[LedgerEntry] = []
        for item in items:
            if isinstance(item, _Unhashed):
                item = record_for(item.envelope, item.direction, item.verdict, item.rule, now=item.now)
            entries.append(chain.append(item))
        unsigned = self._unsigned + len(entries)
        checkpoint = None
        if unsigned and (force_checkpoint or unsigned >= self._every):
            checkpoint = sign_checkpoint(self._key, chain.seq, chain.head, now=time.time())
        self._store.append(entries, checkpoint)
        self._chain = chain
        self.written += len(entries)
        self._unsigned = 0 if checkpoint is not None else unsigned
        if checkpoint is not None:
            self._last_checkpoint = time.monotonic()

    async def aclose(self) -> None:
        """Write what is queued, sign the head and close the file (after cancelling :meth:`run`)."""
        try:
            in_flight = self._in_flight
            if in_flight is not None and not in_flight.done():
                try:  # the batch of a run() cancelled mid-write goes first (the chain continues from it)
                    await asyncio.shield(in_flight)
                except Exception as exc:  # that batch is lost, as a failed write in run() loses it
                    log.error("audit ledger write failed: %s", exc)
                    self._fail_waiters(exc)
            await self._load_head()
            rest = self._take()
            while not self._queue.empty():
                rest.append(self._queue.get_nowait())
                self._queue.task_done()
            await self._write(rest, force_checkpoint=True)
            self._committed(self._recorded - self._durable)  # including the cancelled run()'s batch
        finally:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._store.close)
            self._executor.shutdown(wait=True)
