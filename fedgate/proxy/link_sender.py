"""LinkSender: drains one peer's outbox over a link, reconnecting forever with backoff and jitter.

Rules of this module:

1. A message leaves the outbox only when the peer ACKs it (stored, duplicate, or rejected by its
   audit). Everything else (a cut, a crash, a refusal) means: reconnect and send again from the
   oldest unacknowledged message. Duplicates are the receiver's to drop.
2. Reconnect delays double from ``backoff_initial_s`` up to ``backoff_max_s``, each drawn uniformly
   from [d/2, d] (jitter, so that many gateways do not reconnect in step); a completed handshake
   resets the delay.
3. The peer must be the party the route names: a certificate for another party is refused before
   any message is sent, with a log line saying who was expected and who answered.
4. Memory is bounded: offered-but-unsent messages stay under ``lookahead`` messages and
   ``params.window_bytes`` bytes (large ones are read from the outbox two at a time); sent but
   unacknowledged ones under ``max_unacked`` messages and the peer's credit window in bytes.
5. ``statistics()`` is a frozen snapshot; metrics are updated as events happen.
   ``carrier_statistics()`` is the open connection's congestion controller, where the carrier has one.
6. A message the peer would refuse whatever we do (over its HELLO size limit, a header over the
   frame limits) is not retried forever: it is dropped from the outbox as rejected (rule
   ``link-limits``), logged, counted and handed to ``on_rejected`` like an audit rejection.
7. Lanes (``link.lanes_per_peer``): a sender may own one lane of its peer's messages (its outbox
   view shows only those; its HELLO names the lane). Lane 0 is the link of a gateway without
   lanes. A lane above 0 refuses a peer whose HELLO lacks the ``lanes`` capability: such a peer
   would take each lane's connection for a replacement of the last one. The ``connected`` gauge
   counts the open lanes of the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fedgate.congestion import CongestionStatistics
from fedgate.errors import FedgateError, MessageTooLargeError, PeerUnavailableError
from fedgate.proxy.carrier import ByteChannel
from fedgate.proxy.link_core import K_LANES_CAPABILITY, LinkParams, LinkProtocolViolation, lane_capability
from fedgate.proxy.link_events import (
    ChunkStored,
    ConnectionTerminated,
    HandshakeCompleted,
    LinkEvent,
    MessagesAcked,
    Rejection,
    RttMeasured,
)
from fedgate.proxy.link_frames import check_sendable
from fedgate.proxy.link_metrics import LinkMetrics
from fedgate.proxy.link_send import LinkSenderCore
from fedgate.proxy.link_session import LinkConnection
from fedgate.proxy.store_api import Outbox, OutboxItem

__all__ = [
    "Dial", "LinkSender", "LinkSenderStatistics", "OutboxDepth", "RejectedHook", "backoff_delays", "carrier_dial",
]

log = logging.getLogger("fedgate.link")

Dial = Callable[[], Awaitable[ByteChannel]]
"""Opens a channel to the peer (route lookup, carrier, TLS); raises PeerUnavailableError."""
RejectedHook = Callable[[OutboxItem, Rejection], Awaitable[None]]

K_BATCH = 256  # messages read from the outbox per query
K_IDLE_POLL = 1.0  # seconds; wait_pending timeout, so a stop request is seen promptly
K_LARGE = 64 * 1024  # bytes; messages this large on average are read K_LARGE_BATCH at a time
K_LARGE_BATCH = 2  # messages per outbox query when they are large
K_DEPTH_REFRESH = 1.0  # seconds between outbox depth queries while busy


def backoff_delays(initial: float, maximum: float, *, rng: random.Random) -> Iterator[float]:
    """Reconnect delays (rule 2): the n-th is uniform in [d/2, d] with d = min(initial * 2**n, maximum)."""
    delay = initial
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(delay * 2, maximum)


@runtime_checkable
class OutboxDepth(Protocol):
    """Optional outbox extension: depth and oldest enqueue time for a peer (SQLite store has it)."""

    async def outbox_depth(self, peer: str) -> tuple[int, float | None]: ...


@dataclass(frozen=True, slots=True)
class LinkSenderStatistics:
    """Health of the link towards one peer, for metrics and ``fedgate route show``."""

    peer: str
    state: str
    """``connecting``, ``open``, ``backoff`` or ``stopped``."""
    connected: bool
    reconnects: int
    rtt: float | None
    """Last measured round trip, in seconds."""
    bytes_sent: int
    bytes_acked: int
    messages_sent: int
    messages_acked: int
    messages_rejected: int
    outbox_depth: int | None
    """Messages waiting for the peer, if the outbox can tell."""
    oldest_age_s: float | None
    """Age of the oldest of them, in seconds."""
    last_error: str
    endpoint: str
    clock_skew_s: float | None
    """Peer wall clock minus ours at the last handshake, in seconds (accurate to about one RTT)."""


class LinkSender:
    """Sends ``outbox``'s messages for ``peer``; run :meth:`run` in a task, stop with :meth:`aclose`."""

    def __init__(
        self, *, peer: str, params: LinkParams, outbox: Outbox, dial: Dial, backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0, metrics: LinkMetrics | None = None, on_rejected: RejectedHook | None = None,
        rng: random.Random | None = None, lookahead: int = 256, max_unacked: int = 8192, lane: int = 0,
    ) -> None:
        self.peer = peer
        self.lane = lane
        if lane:
            params = dataclasses.replace(params, capabilities=params.capabilities | {lane_capability(lane)})
        self.params = params
        self._outbox = outbox
        self._dial = dial
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._metrics = metrics
        self._on_rejected = on_rejected
        self._rng = rng or random.Random()
        self._lookahead = lookahead
        self._max_unacked = max_unacked
        self._resume: dict[str, int] = {}
        self._items: dict[str, OutboxItem] = {}
        self._conn: LinkConnection[LinkSenderCore] | None = None
        self._room = asyncio.Event()
        self._stopping = False
        self._state = "connecting"
        self._stats = dict(bytes_acked=0, messages_acked=0, messages_rejected=0)
        self._sent_base = (0, 0)
        """Bytes and messages sent on connections that ended."""
        self._sent_seen = (0, 0)
        """The current core's counters at the last metrics sync."""
        self._reconnects = 0
        self._rtt: float | None = None
        self._skew: float | None = None
        self._depth: tuple[int, float | None] | None = None
        self._last_error = ""
        self._endpoint = ""
        self._acks: list[str] = []
        self._ack_ready = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()
        """Set when the current connection's handshake completed."""
        self._counted = False
        """This sender's open connection is counted in the ``connected`` gauge."""

    # -- public -----------------------------------------------------------------------------------------

    def statistics(self) -> LinkSenderStatistics:
        depth, oldest = self._depth if self._depth else (None, None)
        bytes_sent, messages_sent = self._sent_base
        if self._conn is not None:
            bytes_sent += self._conn.core.bytes_sent
            messages_sent += self._conn.core.messages_sent
        return LinkSenderStatistics(
            bytes_sent=bytes_sent, messages_sent=messages_sent,
            peer=self.peer, state=self._state, connected=self._state == "open", reconnects=self._reconnects,
            rtt=self._rtt, outbox_depth=depth, oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest),
            last_error=self._last_error, endpoint=self._endpoint, clock_skew_s=self._skew, **self._stats,
        )

    def carrier_statistics(self) -> CongestionStatistics | None:
        """The open connection's congestion-controller snapshot, where its carrier keeps one (QUIC)."""
        conn = self._conn
        probe = getattr(conn.channel, "statistics", None) if conn is not None else None
        stats = probe() if callable(probe) else None
        return stats if isinstance(stats, CongestionStatistics) else None

    async def run(self) -> None:
        """Connect, send, reconnect; returns only after :meth:`aclose`."""
        self._run_task = asyncio.current_task()
        delays = backoff_delays(*self._backoff, rng=self._rng)
        attempts = 0
        while not self._stopping:
            if attempts:
                self._reconnects += 1
                if self._metrics:
                    self._metrics.reconnects.labels(self.peer).inc()
            attempts += 1
            self._state = "connecting"
            opened = await self._attempt()
            if self._stopping:
                break
            if opened:
                delays = backoff_delays(*self._backoff, rng=self._rng)
            self._state = "backoff"
            await self._refresh_depth()
            await asyncio.sleep(next(delays))
        self._state = "stopped"

    async def aclose(self, *, drain_timeout: float = 5.0) -> None:
        """Stop sending new messages, wait up to ``drain_timeout`` for acks, close the link, stop."""
        self._stopping = True
        self._room.set()
        conn = self._conn
        if conn is not None and conn.terminated is None:
            core = conn.core
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    while core.unacked and conn.terminated is None:
                        await asyncio.sleep(0.01)
            core.close(now=conn.now(), code="shutdown", reason="sender stopping")
            conn.kick()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.params.keepalive_s):
                    while conn.terminated is None:
                        await asyncio.sleep(0.01)
            if conn.terminated is None:
                conn.finish(ConnectionTerminated("shutdown", "close timed out", by_peer=False))
        if self._run_task is not None and self._run_task is not asyncio.current_task():
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run_task
        self._state = "stopped"

    # -- one connection ---------------------------------------------------------------------------------

    async def _attempt(self) -> bool:
        try:
            channel = await self._dial()
        except (FedgateError, OSError) as exc:
            self._last_error = f"connect failed: {exc}"
            log.warning("link to party %s: %s", self.peer, self._last_error)
            return False
        self._endpoint = channel.description
        loop = asyncio.get_running_loop()
        core = LinkSenderCore(
            self.params, now=loop.time(), expected_peer=self.peer, authenticated_peer=channel.peer_party,
            wall_time=time.time(),
        )
        conn = LinkConnection(core, channel, self._on_event)
        self._opened = asyncio.Event()
        if channel.peer_party is not None and channel.peer_party != self.peer:
            reason = (
                f"refusing link to party {self.peer} at {channel.description}: "
                f"its certificate says party {channel.peer_party!r}"
            )
            log.error("%s", reason)
            event = core.abort(LinkProtocolViolation(reason, code="unauthorized"))
            assert event is not None
            conn.finish(event)
        self._conn = conn
        try:
            why = await conn.run(self._feed(conn, core), self._ack_loop(conn))
        finally:
            self._conn = None
            self._sync_sent(core)
            self._sent_base = (self._sent_base[0] + core.bytes_sent, self._sent_base[1] + core.messages_sent)
            self._sent_seen = (0, 0)
            if self._metrics and self._counted:
                self._metrics.connected.labels(self.peer).dec()
            self._counted = False
        opened = core.peer_party is not None
        if why.code not in ("normal", "shutdown") or not self._stopping:
            self._last_error = f"{why.code}: {why.reason}"
            level = logging.ERROR if why.code == "unauthorized" else logging.WARNING
            log.log(level, "link to party %s at %s ended: %s", self.peer, channel.description, self._last_error)
        try:
            await self._flush_acks()
        except (FedgateError, OSError) as exc:  # they stay in the outbox: resent, and the peer dedups them
            log.warning("link to party %s: recording acknowledgements failed: %s", self.peer, exc)
        return opened

    async def _on_event(self, event: LinkEvent) -> None:
        m = self._metrics
        self._room.set()
        if self._conn is not None:
            self._sync_sent(self._conn.core)
        if isinstance(event, MessagesAcked):
            ids = list(event.message_ids) + [r.message_id for r in event.rejected]
            self._acks.extend(ids)
            self._ack_ready.set()
            self._stats["messages_acked"] += len(event.message_ids)
            self._stats["messages_rejected"] += len(event.rejected)
            self._stats["bytes_acked"] += event.acked_bytes
            if m:
                m.messages_acked.labels(self.peer).inc(len(event.message_ids))
                m.bytes_acked.labels(self.peer).inc(event.acked_bytes)
            for rejection in event.rejected:
                log.warning(
                    "party %s rejected message %s: rule %s: %s", self.peer, rejection.message_id, rejection.rule,
                    rejection.detail,
                )
                if m:
                    m.messages_rejected.labels(self.peer).inc()
                item = self._items.get(rejection.message_id)
                if item is not None and self._on_rejected is not None:
                    await self._on_rejected(item, rejection)
            for mid in ids:
                self._resume.pop(mid, None)
                self._items.pop(mid, None)
        elif isinstance(event, ChunkStored):
            self._resume[event.message_id] = event.offset
        elif isinstance(event, RttMeasured):
            self._rtt = event.rtt
            if m:
                m.rtt.labels(self.peer).set(event.rtt)
        elif isinstance(event, HandshakeCompleted):
            if self.lane and K_LANES_CAPABILITY not in event.capabilities and self._conn is not None:
                reason = (f"party {self.peer} runs a fedgate without lanes: lane {self.lane} stays closed and its "
                          f"messages wait; set link.lanes_per_peer = 1 here or upgrade that gateway")
                aborted = self._conn.core.abort(LinkProtocolViolation(reason, code="version"))
                if aborted is not None:
                    self._conn.finish(aborted)
                return
            if event.peer_wall_time is not None:  # within about one RTT: HELLOs cross at connection start
                self._skew = event.peer_wall_time - time.time()
            self._opened.set()
            self._state = "open"
            self._last_error = ""
            log.info("link to party %s open (version %d%s)", self.peer, event.version,
                     f", lane {self.lane}" if self.lane else "")
            if m and not self._counted:
                m.connected.labels(self.peer).inc()
                self._counted = True

    async def _ack_loop(self, conn: LinkConnection[LinkSenderCore]) -> None:
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while conn.terminated is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(K_DEPTH_REFRESH):
                    await self._ack_ready.wait()
            self._ack_ready.clear()
            await self._flush_acks()
            if loop.time() - refreshed >= K_DEPTH_REFRESH:
                refreshed = loop.time()
                await self._refresh_depth()

    async def _flush_acks(self) -> None:
        if self._acks:
            ids, self._acks = self._acks, []
            await self._outbox.ack(self.peer, ids)

    async def _feed(self, conn: LinkConnection[LinkSenderCore], core: LinkSenderCore) -> None:
        """Offer outbox items to the core in seq order while there is room (rule 4)."""
        after_seq = 0
        limit = K_BATCH
        self._items.clear()
        await self._opened.wait()  # the peer's limits (HELLO) decide what may be offered
        while not self._stopping and conn.terminated is None:
            if (core.unsent >= self._lookahead or core.unacked >= self._max_unacked
                    or core.unsent_bytes >= self.params.window_bytes):
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(K_IDLE_POLL):
                        await self._room.wait()
                continue
            items = await self._outbox.pending(self.peer, after_seq=after_seq, limit=limit)
            if not items:
                await self._refresh_depth()
                await self._outbox.wait_pending(self.peer, after_seq=after_seq, timeout=K_IDLE_POLL)
                continue
            for item in items:
                after_seq = item.seq
                try:
                    check_sendable(item.envelope, max_message_bytes=core.peer_max_message)
                except MessageTooLargeError as exc:
                    await self._dead_letter(item, exc)
                    continue
                core.offer(item.envelope, resume_offset=self._resume.get(item.envelope.message_id, 0))
                self._items[item.envelope.message_id] = item
            # Large messages are read a few at a time, so memory stays near the credit window.
            average = sum(item.envelope.size for item in items) // len(items)
            limit = K_BATCH if average < K_LARGE else K_LARGE_BATCH
            conn.kick()
            await asyncio.sleep(0)

    async def _dead_letter(self, item: OutboxItem, exc: MessageTooLargeError) -> None:
        """A message the peer would refuse on every try: treat it as rejected (rule 6) instead of
        failing the link forever."""
        rejection = Rejection(item.envelope.message_id, "link-limits", str(exc))
        log.error("message %s to party %s cannot be sent and is dropped from the outbox: %s",
                  item.envelope.message_id, self.peer, exc)
        self._stats["messages_rejected"] += 1
        if self._metrics:
            self._metrics.messages_rejected.labels(self.peer).inc()
        if self._on_rejected is not None:
            await self._on_rejected(item, rejection)
        await self._outbox.ack(self.peer, [item.envelope.message_id])

    def _sync_sent(self, core: LinkSenderCore) -> None:
        """Move the core's send counters into the metrics (deltas since the last sync)."""
        sent, msgs = core.bytes_sent - self._sent_seen[0], core.messages_sent - self._sent_seen[1]
        self._sent_seen = (core.bytes_sent, core.messages_sent)
        if self._metrics and (sent or msgs):
            self._metrics.bytes_sent.labels(self.peer).inc(sent)
            self._metrics.messages_sent.labels(self.peer).inc(msgs)

    async def _refresh_depth(self) -> None:
        if isinstance(self._outbox, OutboxDepth):
            with contextlib.suppress(FedgateError, OSError):
                self._depth = await self._outbox.outbox_depth(self.peer)
                if self._metrics:
                    self._metrics.outbox_depth.labels(self.peer).set(self._depth[0])
                    oldest = self._depth[1]
                    self._metrics.outbox_age.labels(self.peer).set(0 if oldest is None else time.time() - oldest)


def carrier_dial(
    carrier_connect: Callable[..., Awaitable[ByteChannel]], host: str, port: int, **kwargs: object
) -> Dial:
    """A :data:`Dial` for ``carrier.connect`` with fixed arguments (tls, server_hostname, timeout)."""

    async def dial() -> ByteChannel:
        try:
            return await carrier_connect(host, port, **kwargs)
        except OSError as exc:
            raise PeerUnavailableError(f"{host}:{port}: {exc}") from exc

    return dial
