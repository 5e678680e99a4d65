"""The ledger's asyncio adapter: a bounded queue in front of one writer task and one SQLite thread.

Rules of this module:

1. Callers on the event loop never touch SQLite: :meth:`LedgerWriter.record` hashes the payload
   (via ``ledger_core.record_for``) and queues the record; :meth:`run` drains the queue in batches
   of up to ``batch`` records, chains them (pure core) and writes each batch in one transaction on
   a dedicated thread.
2. Backpressure is explicit: the queue holds ``queue_size`` records; :meth:`append` waits for room,
   :meth:`record` / :meth:`append_nowait` raise :class:`~fedgate.errors.StoreFullError` when full
   (the front then fails the push with RESOURCE_EXHAUSTED: a message is never passed unrecorded).
3. A signed checkpoint is written with the batch that completes ``checkpoint_every`` entries, when
   ``checkpoint_interval_s`` passed with unsigned entries, and on :meth:`aclose`.
4. A failed SQLite write ends :meth:`run` with the exception (the task group sees it); nothing is
   retried silently.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedgate.audit.config import AuditConfig
from fedgate.audit.keys import load_signing_key
from fedgate.audit.ledger_core import HashChain, LedgerEntry, LedgerRecord, record_for, sign_checkpoint
from fedgate.audit.ledger_store import LedgerStore
from fedgate.errors import StoreFullError
from fedgate.proxy.envelope import Envelope

__all__ = ["LedgerWriter"]


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
    ) -> None:
        self._store = store
        self._key = key
        self._every = checkpoint_every
        self._interval = checkpoint_interval_s
        self._batch = batch
        self._queue: asyncio.Queue[LedgerRecord] = asyncio.Queue(queue_size)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fedgate-ledger")
        self._chain: HashChain | None = None
        self._unsigned = 0
        self._last_checkpoint = 0.0
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
        )

    def record(self, envelope: Envelope, direction: str, verdict: str, rule: str, *, now: float) -> None:
        """Queue the record of one audited message; StoreFullError when the queue is full."""
        self.append_nowait(record_for(envelope, direction, verdict, rule, now=now))

    def append_nowait(self, record: LedgerRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull as exc:
            raise StoreFullError(f"audit ledger queue is full ({self._queue.maxsize} records)") from exc

    async def append(self, record: LedgerRecord) -> None:
        """Queue a record, waiting while the queue is full."""
        await self._queue.put(record)

    async def flush(self) -> None:
        """Wait until every record queued so far is written (needs :meth:`run` running)."""
        await self._queue.join()

    async def run(self) -> None:
        """The writer task: run it in the gateway's task group until cancelled."""
        loop = asyncio.get_running_loop()
        seq, head = await loop.run_in_executor(self._executor, self._store.head)
        self._chain = HashChain(seq=seq, head=head)
        self._last_checkpoint = loop.time()
        while True:
            timeout = max(0.0, self._last_checkpoint + self._interval - loop.time())
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=timeout if self._unsigned else None)
            except TimeoutError:
                await self._write([], force_checkpoint=True)
                continue
            batch = [first]
            while len(batch) < self._batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                due = loop.time() - self._last_checkpoint >= self._interval
                await self._write(batch, force_checkpoint=due)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, records: list[LedgerRecord], *, force_checkpoint: bool) -> None:
        assert self._chain is not None
        loop = asyncio.get_running_loop()
        entries: list[LedgerEntry] = [self._chain.append(r) for r in records]
        self._unsigned += len(entries)
        checkpoint = None
        if self._unsigned and (force_checkpoint or self._unsigned >= self._every):
            checkpoint = sign_checkpoint(self._key, self._chain.seq, self._chain.head, now=time.time())
        await loop.run_in_executor(self._executor, self._store.append, entries, checkpoint)
        self.written += len(entries)
        if checkpoint is not None:
            self._unsigned = 0
            self._last_checkpoint = loop.time()

    async def aclose(self) -> None:
        """Write what is queued, sign the head and close the file (after cancelling :meth:`run`)."""
        if self._chain is None:
            loop = asyncio.get_running_loop()
            seq, head = await loop.run_in_executor(self._executor, self._store.head)
            self._chain = HashChain(seq=seq, head=head)
        rest: list[LedgerRecord] = []
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
            self._queue.task_done()
        await self._write(rest, force_checkpoint=True)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._store.close)
        self._executor.shutdown(wait=True)
