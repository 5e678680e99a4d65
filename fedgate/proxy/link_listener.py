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
   copy meets the same hook again, so a deterministic policy gives the same answer.
5. A newer connection from the same party replaces the older one (``replaced``), except a probe
   (HELLO capability ``probe``, sent by ``fedgate doctor``), which never carries messages.
6. A message the store can never take (MessageTooLargeError) is rejected (rule ``store-limits``),
   final like an audit rejection, so it cannot wedge the link; set ``LinkParams.max_message_bytes``
   to the store's limit and senders drop such messages before sending them (HELLO ``m``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fedgate.errors import MessageTooLargeError, StoreFullError
from fedgate.proxy.carrier import ByteChannel
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import LinkParams, LinkProtocolViolation
from fedgate.proxy.link_events import ChunkReceived, ConnectionTerminated, HandshakeCompleted, LinkEvent, Rejection
from fedgate.proxy.link_metrics import LinkMetrics
from fedgate.proxy.link_recv import LinkReceiverCore, plan_chunk
from fedgate.proxy.link_session import LinkConnection
from fedgate.proxy.store_api import Inbox

__all__ = ["K_PROBE_CAPABILITY", "InboundHook", "LinkListener", "LinkListenerStatistics"]

log = logging.getLogger("fedgate.link")

K_PROBE_CAPABILITY = "probe"  # HELLO capability of a diagnostic connection (fedgate doctor)

InboundHook = Callable[[Envelope], Awaitable[Rejection | None]]
"""Inspect a complete inbound message: None accepts, a Rejection refuses it for good."""


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
    ) -> None:
        self.params = params
        self._inbox = inbox
        self._allow = allow
        self._on_inbound = on_inbound
        self._metrics = metrics
        self._retry = (retry_initial_s, retry_max_s)
        self._by_party: dict[str, LinkConnection[LinkReceiverCore]] = {}
        self._open = 0
        self._counts = collections.Counter[str]()

    def statistics(self) -> LinkListenerStatistics:
        c = self._counts
        return LinkListenerStatistics(
            connections=self._open, peers=tuple(sorted(self._by_party)), messages_stored=c["stored"],
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
            if party is not None and self._by_party.get(party) is session.conn:
                del self._by_party[party]
                if self._metrics:
                    self._metrics.inbound_connections.labels(party).dec()
        if why.code not in ("normal", "shutdown", "replaced"):
            # A bare connect-and-close (a port check) is not worth a warning; a broken link is.
            quiet = core.peer_party is None and why.code in ("eof", "io_error")
            log.log(logging.INFO if quiet else logging.WARNING, "link from %s (party %s) ended: %s: %s",
                    channel.description, core.peer_party, why.code, why.reason)

    # -- called by sessions -----------------------------------------------------------------------------

    def _admit(self, session: _InboundSession, party: str, *, probe: bool) -> bool:
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
        old = self._by_party.get(party)
        if old is None:
            if self._metrics:
                self._metrics.inbound_connections.labels(party).inc()
        elif old.terminated is None:  # the gauge is handed over, not counted twice
            old.core.close(now=old.now(), code="replaced", reason="a newer connection from the same party")
            old.finish(ConnectionTerminated("replaced", "a newer connection from the same party", by_peer=False))
        self._by_party[party] = session.conn
        return True

    async def _store(self, write: Callable[[], Awaitable[bool | None]], party: str) -> bool | None:
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
        self._tracked: tuple[str, int] | None = None
        """(message id, bytes staged once the queued appends are done) of the message being received."""
        self._staging: asyncio.Queue[_Staged] = asyncio.Queue()  # bounded by credit
        self._lanes: dict[tuple[str, str], collections.deque[tuple[Envelope, int]]] = {}

    async def _on_event(self, event: LinkEvent) -> None:
        if isinstance(event, ChunkReceived):
            await self._on_chunk(event)
        elif isinstance(event, HandshakeCompleted):
            self.party = event.peer_party
            self.listener._admit(self, event.peer_party, probe=K_PROBE_CAPABILITY in event.capabilities)

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
        listener, core, m = self.listener, self.core, self.listener._metrics
        try:
            while lane:
                envelope, charge = lane[0]
                verdict = await listener._on_inbound(envelope) if listener._on_inbound else None
                if verdict is not None:
                    core.reject(envelope.message_id, rule=verdict.rule, detail=verdict.detail)
                    listener._counts["rejected"] += 1
                    if m:
                        m.inbound_rejected.labels(self.party).inc()
                else:
                    async def deliver(env: Envelope = envelope) -> bool:
                        return await listener._inbox.deliver(env)

                    try:
                        fresh = await listener._store(deliver, self.party)
                    except MessageTooLargeError as exc:  # can never fit: final, like an audit rejection
                        log.error("message %s from party %s refused: %s", envelope.message_id, self.party, exc)
                        core.reject(envelope.message_id, rule="store-limits", detail=str(exc))
                        listener._counts["rejected"] += 1
                    else:
                        core.ack(envelope.message_id)
                        listener._counts["stored" if fresh else "duplicates"] += 1
                        if m:
                            (m.received_messages if fresh else m.duplicates).labels(self.party).inc()
                core.release(charge)
                lane.popleft()
                self.conn.kick()
        finally:
            del self._lanes[key]
