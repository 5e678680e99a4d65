"""LinkListener: accepts link channels from peer gateways and delivers their messages into an Inbox.

Rules of this module:

1. The peer's party is its certificate's (``channel.peer_party``); HELLO must agree with it and
   ``allow(party)`` (the route table) must say yes, else the link is refused with a log line.
2. A message is acknowledged only after ``Inbox.deliver`` returned (durable; a duplicate counts as
   delivered); a chunk's credit is returned only after it is staged. ``StoreFullError`` never drops
   anything: the write is retried with backoff while the sender runs out of credit (backpressure).
3. Order: chunks are staged in wire order by one staging task; complete messages go to one delivery
   lane per (session, topic), FIFO, lanes run concurrently. Order per (session, topic) is what the
   destination queues promise, and a slow topic does not stall the others.
4. The ``on_inbound`` hook (the audit chain) sees each complete message before it is delivered.
   Returning a :class:`Rejection` is final: the message is not stored, the sender is told
   (ACK ``r``) and drops it from its outbox; the hook is where it gets recorded (ledger). A resent
   copy meets the same hook again, so a deterministic policy gives the same answer. When
   ``inbound_synced`` is given (the ledger's commit barrier), it is awaited once per delivery batch,
   after the hook saw the batch and before anything of it is stored or acknowledged.
5. A newer connection from the same party and lane (HELLO capability ``lane=N``, 0 without one)
   replaces the older one (``replaced``); the lanes of one party run side by side. A probe (HELLO
   capability ``probe``, sent by ``fedgate doctor``) never replaces anything and carries no messages.
6. A message the store can never take (MessageTooLargeError) is rejected (rule ``store-limits``),
   final like an audit rejection, so it cannot wedge the link; set ``LinkParams.max_message_bytes``
   to the store's limit and senders drop such messages before sending them (HELLO ``m``).
7. Small messages are batched into the store: a lane hands up to K_LANE_BATCH queued messages to
   ``deliver_many`` when the inbox has it (:class:`InboxBatch`), in order, in one durable write.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from fedgate.errors import MessageTooLargeError, StoreFullError
from fedgate.proxy.carrier import ByteChannel
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import LinkParams, LinkProtocolViolation, lane_of
from fedgate.proxy.link_events import ChunkReceived, ConnectionTerminated, HandshakeCompleted, LinkEvent, Rejection
from fedgate.proxy.link_metrics import LinkMetrics
from fedgate.proxy.link_recv import LinkReceiverCore, plan_chunk
from fedgate.proxy.link_session import LinkConnection
from fedgate.proxy.store_api import Inbox

__all__ = ["K_PROBE_CAPABILITY", "InboundHook", "InboxBatch", "LinkListener", "LinkListenerStatistics"]

log = logging.getLogger("fedgate.link")

K_PROBE_CAPABILITY = "probe"  # HELLO capability of a diagnostic connection (fedgate doctor)
K_LANE_BATCH = 256  # messages of one topic stored in one write (with deliver_many)

T = TypeVar("T")

InboundHook = Callable[[Envelope], Awaitable[Rejection | None]]
"""Inspect a complete inbound message: None accepts, a Rejection refuses it for good."""


@runtime_checkable
class InboxBatch(Protocol):
    """Optional Inbox extension: several messages in one durable write (proposed for store_api)."""

    async def deliver_many(self, envelopes: list[Envelope]) -> list[bool]:
        """``deliver`` for each, in order, in one transaction: all stored (True) or duplicate (False),
        or an exception and none stored (StoreFullError / MessageTooLargeError as ``deliver``)."""
        ...


@dataclass(frozen=True, slots=True)
class LinkListenerStatistics:
    connections: int
    """Open link connections."""
    peers: tuple[str, ...]
    messages_stored: int
    duplicates: int
    rejected: int
    bytes_received: int
    store_full_retries: int
    refused: int
    """Connections refused (party not allowed or certificate mismatch)."""


class LinkListener:
    """Hand :meth:`handle` to ``carrier.listen(..., handler=listener.handle)``."""

    def __init__(
        self, *, params: LinkParams, inbox: Inbox, allow: Callable[[str], bool],
        on_inbound: InboundHook | None = None, metrics: LinkMetrics | None = None,
        retry_initial_s: float = 0.05, retry_max_s: float = 1.0,
        inbound_synced: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._inbound_synced = inbound_synced
        self.params = params
        self._inbox = inbox
        self._batch_inbox = inbox if isinstance(inbox, InboxBatch) else None
        self._allow = allow
        self._on_inbound = on_inbound
        self._metrics = metrics
        self._retry = (retry_initial_s, retry_max_s)
        self._by_party: dict[tuple[str, int], LinkConnection[LinkReceiverCore]] = {}  # (party, lane)
        self._open = 0
        self._counts = collections.Counter[str]()

    def statistics(self) -> LinkListenerStatistics:
        c = self._counts
        return LinkListenerStatistics(
            connections=self._open, peers=tuple(sorted({party for party, _ in self._by_party})),
            messages_stored=c["stored"],
            duplicates=c["duplicates"], rejected=c["rejected"], bytes_received=c["bytes"],
            store_full_retries=c["store_full"], refused=c["refused"],
        )

    async def handle(self, channel: ByteChannel) -> None:
        """Serve one inbound channel until it ends."""
        loop = asyncio.get_running_loop()
        core = LinkReceiverCore(self.params, now=loop.time(), authenticated_peer=channel.peer_party,
                                wall_time=time.time())
        session = _InboundSession(self, core, channel)
        self._open += 1
        try:
            why = await session.conn.run(session.run_staging())
        finally:
            self._open -= 1
            party = core.peer_party
            key = (party or "", session.lane)
            if party is not None and self._by_party.get(key) is session.conn:
                del self._by_party[key]
                if self._metrics:
                    self._metrics.inbound_connections.labels(party).dec()
        if why.code not in ("normal", "shutdown", "replaced"):
            # A bare connect-and-close (a port check) is not worth a warning; a broken link is.
            quiet = core.peer_party is None and why.code in ("eof", "io_error")
            log.log(logging.INFO if quiet else logging.WARNING, "link from %s (party %s) ended: %s: %s",
                    channel.description, core.peer_party, why.code, why.reason)

    # -- called by sessions -----------------------------------------------------------------------------

    def _admit(self, session: _InboundSession, party: str, *, probe: bool, lane: int = 0) -> bool:
        if not self._allow(party):
            self._counts["refused"] += 1
            reason = f"refusing link from {session.conn.channel.description}: party {party!r} is not allowed"
            log.error("%s", reason)
            event = session.conn.core.abort(LinkProtocolViolation(reason, code="unauthorized"))
            if event is not None:
                session.conn.finish(event)
            return False
        if probe:  # ``fedgate doctor``: checked like a link, but it must not replace the live one
            return True
        old = self._by_party.get((party, lane))
        if old is None:
            if self._metrics:
                self._metrics.inbound_connections.labels(party).inc()
        elif old.terminated is None:  # the gauge is handed over, not counted twice
            why = f"a newer connection from the same party (lane {lane})"
            old.core.close(now=old.now(), code="replaced", reason=why)
            old.finish(ConnectionTerminated("replaced", why, by_peer=False))
        self._by_party[(party, lane)] = session.conn
        return True

    async def _store(self, write: Callable[[], Awaitable[T]], party: str) -> T:
        """Run a store write, retrying StoreFullError with backoff for as long as it takes (rule 2)."""
        delay = self._retry[0]
        while True:
            try:
                return await write()
            except StoreFullError as exc:
                self._counts["store_full"] += 1
                if self._metrics:
                    self._metrics.store_full.labels(party).inc()
                if delay == self._retry[0]:
                    log.warning("store full, holding back the link from party %s: %s", party, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry[1])


@dataclass(frozen=True, slots=True)
class _Staged:
    """One MSG frame's work for the staging task, in wire order."""

    envelope: Envelope
    charge: int
    payload: bytes | None = None
    """The whole message (single-frame messages skip staging)."""
    append: bytes | None = None
    at: int = 0
    last: bool = False
    total: int = 0


class _InboundSession:
    """State of one inbound connection: the staging cursor, the staging task and the delivery lanes.

    The reader only decides (where a chunk goes, whether to ask for a rewind); the store writes run in
    the staging task, in wire order, so a slow or full store never stops the reader from answering
    PINGs (credit already stops the sender).
    """

    def __init__(self, listener: LinkListener, core: LinkReceiverCore, channel: ByteChannel) -> None:
        self.listener = listener
        self.core = core
        self.conn = LinkConnection(core, channel, self._on_event)
        self.party = "?"
        self.lane = 0
        self._tracked: tuple[str, int] | None = None
        """(message id, bytes staged once the queued appends are done) of the message being received."""
        self._staging: asyncio.Queue[_Staged] = asyncio.Queue()  # bounded by credit
        self._lanes: dict[tuple[str, str], collections.deque[tuple[Envelope, int]]] = {}

    async def _on_event(self, event: LinkEvent) -> None:
        if isinstance(event, ChunkReceived):
            await self._on_chunk(event)
        elif isinstance(event, HandshakeCompleted):
            self.party = event.peer_party
            try:
                self.lane = lane_of(event.capabilities)
            except LinkProtocolViolation as exc:
                log.error("link from %s (party %s): %s", self.conn.channel.description, event.peer_party, exc)
                aborted = self.core.abort(exc)
                if aborted is not None:
                    self.conn.finish(aborted)
                return
            self.listener._admit(self, event.peer_party, probe=K_PROBE_CAPABILITY in event.capabilities,
                                 lane=self.lane)

    async def _on_chunk(self, ev: ChunkReceived) -> None:
        listener, core = self.listener, self.core
        mid = ev.envelope.message_id
        listener._counts["bytes"] += len(ev.data)
        if listener._metrics:
            listener._metrics.received_bytes.labels(self.party).inc(len(ev.data))
        if ev.whole:
            self._staging.put_nowait(_Staged(ev.envelope, ev.charge, payload=ev.data))
            return
        if self._tracked is None or self._tracked[0] != mid:
            self._tracked = (mid, await listener._inbox.partial_size(mid))
        have = self._tracked[1]
        plan = plan_chunk(have=have, offset=ev.offset, data=ev.data)
        if plan.resume:  # the store lacks bytes before this chunk: rewind the sender to ``have``
            core.resume(mid, have)
            core.release(ev.charge)
            return
        if plan.hint:
            core.progress(mid, have)
        append = None
        if plan.append is not None:
            append = ev.data if len(plan.append) == len(ev.data) else bytes(plan.append)
        self._staging.put_nowait(_Staged(ev.envelope, ev.charge, append=append, at=have, last=ev.last,
                                         total=ev.total))
        self._tracked = None if ev.last else (mid, have + len(append or b""))

    async def run_staging(self) -> None:
        """Store chunks in wire order; hand complete messages to their lanes (rule 3)."""
        listener, inbox, core = self.listener, self.listener._inbox, self.core
        while True:
            item = await self._staging.get()
            mid = item.envelope.message_id
            if item.payload is not None:
                self._enqueue(dataclasses.replace(item.envelope, payload=item.payload), item.charge)
                continue
            if item.append is not None:
                chunk, at = item.append, item.at

                async def append(mid: str = mid, chunk: bytes = chunk, at: int = at) -> None:
                    await inbox.append_partial(mid, at, chunk)

                await listener._store(append, self.party)
                core.progress(mid, at + len(chunk))
            if item.last:
                payload = await inbox.take_partial(mid)
                if len(payload) != item.total:
                    raise LinkProtocolViolation(f"message {mid}: staged {len(payload)} bytes, expected {item.total}")
                self._enqueue(dataclasses.replace(item.envelope, payload=payload), item.charge)
            else:
                core.release(item.charge)
            self.conn.kick()

    def _enqueue(self, envelope: Envelope, charge: int) -> None:
        key = (envelope.session_id, envelope.topic)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = collections.deque()
            self.conn.spawn(self._run_lane(key, lane))
        lane.append((envelope, charge))

    async def _run_lane(self, key: tuple[str, str], lane: collections.deque[tuple[Envelope, int]]) -> None:
        """Deliver a topic's messages in order, up to K_LANE_BATCH per store write (rule 7)."""
        listener, core, m, hook = self.listener, self.core, self.listener._metrics, self.listener._on_inbound
        try:
            while lane:
                batch = list(itertools.islice(lane, K_LANE_BATCH))
                verdicts = [await hook(env) if hook else None for env, _ in batch]
                if listener._inbound_synced is not None:
                    await listener._inbound_synced()  # what the hook recorded is durable before any ack
                outcomes = iter(await self._deliver([env for (env, _), v in zip(batch, verdicts) if v is None]))
                for (envelope, charge), verdict in zip(batch, verdicts):
                    outcome = next(outcomes) if verdict is None else None
                    if isinstance(outcome, MessageTooLargeError):  # can never fit: final, like an audit rejection
                        log.error("message %s from party %s refused: %s", envelope.message_id, self.party, outcome)
                        verdict = Rejection(envelope.message_id, "store-limits", str(outcome))
                    if verdict is not None:
                        core.reject(envelope.message_id, rule=verdict.rule, detail=verdict.detail)
                        listener._counts["rejected"] += 1
                        if m:
                            m.inbound_rejected.labels(self.party).inc()
                    else:
                        core.ack(envelope.message_id)
                        listener._counts["stored" if outcome else "duplicates"] += 1
                        if m:
                            (m.received_messages if outcome else m.duplicates).labels(self.party).inc()
                    core.release(charge)
                    lane.popleft()
                self.conn.kick()
        finally:
            del self._lanes[key]

    async def _deliver(self, envelopes: list[Envelope]) -> list[bool | MessageTooLargeError]:
        """Store in order: one ``deliver_many`` where the inbox has it, else one ``deliver`` each."""
        listener, party = self.listener, self.party
        batch_inbox = listener._batch_inbox
        if len(envelopes) > 1 and batch_inbox is not None:
            try:
                return list(await listener._store(lambda: batch_inbox.deliver_many(envelopes), party))
            except MessageTooLargeError:
                pass  # one of them can never fit: find it below, the others go in one by one
        out: list[bool | MessageTooLargeError] = []
        for env in envelopes:
            try:
                out.append(await listener._store(functools.partial(listener._inbox.deliver, env), party))
            except MessageTooLargeError as exc:
                out.append(exc)
        return out
