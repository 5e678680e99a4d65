"""The sans-IO core of one RDMA channel: what to post, what arrived, what to deliver.

Rules of this module:

1. Pure, in the aioquic/h11 manner: the adapter feeds completions (``on_send_complete``,
   ``on_recv``, ``on_read_complete``) and application calls (``queue_*``, ``consumed``), then pulls
   :meth:`RdmaSession.actions` and executes them in order. Time enters only as keyword ``now``.
2. Memory is named, never touched: receive slots and send slots by index, eager payloads and
   rendezvous buffers by the adapter's integer tokens.
3. Order of actions matters and is kept: a slot is reposted (PostRecv) before any SEND that reports
   it to the peer as a returned credit, so the peer never meets a receiver-not-ready.
4. CLOSE is a half-close: after it a side sends no DATA or RTS, but still returns credits and
   FINs for what it receives.
5. Messages are delivered in the order they were sent, eager and rendezvous alike: a large message
   blocks the ones behind it until its READs complete.
6. After :meth:`fail` or any exception raised here the session is in ERROR and stays there.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from fedgate.errors import RemoteProtocolError
from fedgate.rdma._credits import CreditWindow
from fedgate.rdma._rendezvous import ReadChunk, ReadScheduler, RendezvousSenders, TransferState
from fedgate.rdma._wire import K_HEADER_BYTES, MsgKind, decode_header, decode_rts, encode_header, encode_rts

__all__ = [
    "Action",
    "Delivery",
    "EagerMessage",
    "EndOfStream",
    "LargeMessage",
    "PostRead",
    "PostRecv",
    "PostSend",
    "RdmaSession",
    "ReleaseSource",
    "SessionState",
]


@dataclass(frozen=True, slots=True)
class PostSend:
    """Write ``header`` (and the eager payload ``token``, if any) into send slot ``slot``; post a SEND."""

    slot: int
    header: bytes
    token: int | None


@dataclass(frozen=True, slots=True)
class PostRecv:
    """Post receive slot ``slot``."""

    slot: int


@dataclass(frozen=True, slots=True)
class PostRead:
    """Post one RDMA READ of a rendezvous transfer (allocate its buffer at offset 0)."""

    chunk: ReadChunk


@dataclass(frozen=True, slots=True)
class ReleaseSource:
    """The peer is done with rendezvous buffer ``token``; return it to the pool."""

    token: int


Action = PostSend | PostRecv | PostRead | ReleaseSource


@dataclass(frozen=True, slots=True)
class EagerMessage:
    """A message in receive slot ``slot``: ``length`` bytes after the header."""

    slot: int
    length: int


@dataclass(frozen=True, slots=True)
class LargeMessage:
    """A rendezvous message, complete in the local buffer of transfer ``ident``."""

    ident: int
    length: int


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer closed the channel in order; nothing follows."""


Delivery = EagerMessage | LargeMessage | EndOfStream


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # CLOSE queued; no more queue_* calls
    CLOSED = "closed"  # our CLOSE completed
    ERROR = "error"


class RdmaSession:
    """One channel's protocol state."""

    def __init__(
        self,
        *,
        recv_slots: int,
        send_slots: int,
        peer_recv_slots: int,
        max_eager: int,
        chunk_bytes: int,
        max_reads: int,
        max_rendezvous: int,
    ) -> None:
        self.max_eager = max_eager
        self.credits = CreditWindow(send_window=peer_recv_slots, recv_window=recv_slots)
        self.reads = ReadScheduler(chunk_bytes=chunk_bytes, max_reads=max_reads)
        self.senders = RendezvousSenders(max_outstanding=max_rendezvous)
        self.state = SessionState.OPEN
        self.peer_closed = False
        self._free_send = deque(range(send_slots))
        self._out: deque[tuple[MsgKind, int, int, int, int]] = deque()  # kind, token, length, addr, rkey
        self._fins: deque[int] = deque()
        self._inbound: deque[Delivery] = deque()
        self._actions: list[Action] = [PostRecv(i) for i in range(recv_slots)]
        self._posted: dict[tuple[str, int, int], float] = {}
        self._close_slot: int | None = None

    # --- application side -------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Messages queued and not yet posted."""
        return len(self._out)

    def queue_eager(self, token: int, length: int) -> None:
        self._check_open()
        if not 0 < length <= self.max_eager:
            raise ValueError(f"eager message of {length} bytes (limit {self.max_eager})")
        self._out.append((MsgKind.DATA, token, length, 0, 0))

    def can_start_rendezvous(self) -> bool:
        return self.senders.has_room()

    def queue_rendezvous(self, token: int, length: int, *, addr: int, rkey: int) -> int:
        self._check_open()
        ident = self.senders.start(token)
        self._out.append((MsgKind.RTS, ident, length, addr, rkey))
        return ident

    def queue_close(self) -> None:
        self._check_open()
        self.state = SessionState.CLOSING
        self._out.append((MsgKind.CLOSE, 0, 0, 0, 0))

    def next_delivery(self) -> Delivery | None:
        """The next message in order, if it is complete."""
        if not self._inbound:
            return None
        head = self._inbound[0]
        if isinstance(head, LargeMessage) and self.reads.get(head.ident).state is not TransferState.COMPLETE:
            return None
        return head

    def consumed(self, delivery: Delivery) -> None:
        """The application took ``delivery`` (the head); free its slot or buffer."""
        if not self._inbound or self._inbound[0] is not delivery:
            raise RuntimeError("consumed() must name the delivery at the head")
        if isinstance(delivery, EndOfStream):
            return  # stays at the head: every later receive sees the end of stream
        self._inbound.popleft()
        if isinstance(delivery, EagerMessage):
            self._repost(delivery.slot)
        else:
            self.reads.forget(delivery.ident)
            if self.state is not SessionState.ERROR:
                self._fins.append(delivery.ident)

    # --- completions ------------------------------------------------------------------------

    def on_send_complete(self, slot: int) -> None:
        self._posted.pop(("send", slot, 0), None)
        self._free_send.append(slot)
        if slot == self._close_slot:
            self.state = SessionState.CLOSED

    def on_recv(self, slot: int, head: bytes | memoryview, byte_len: int) -> None:
        """Receive slot ``slot`` holds a SEND of ``byte_len`` bytes starting with ``head``."""
        try:
            header = decode_header(head, byte_len)
            if self.peer_closed and header.kind in (MsgKind.DATA, MsgKind.RTS, MsgKind.CLOSE):
                raise RemoteProtocolError(f"rdma {header.kind.name} after CLOSE")
            self.credits.on_returned(header.credits)
            kind = header.kind
            if kind is MsgKind.DATA:
                self._inbound.append(EagerMessage(slot, header.length))
                return
            if kind is MsgKind.RTS:
                total, addr, rkey = decode_rts(head)
                self.reads.announce(ident=header.ident, total=total, addr=addr, rkey=rkey)
                self._inbound.append(LargeMessage(header.ident, total))
            elif kind is MsgKind.FIN:
                self._actions.append(ReleaseSource(self.senders.finish(header.ident)))
            elif kind is MsgKind.CLOSE:
                self.peer_closed = True  # half-close: the peer may still send CREDIT and FIN
                self._inbound.append(EndOfStream())
            self._repost(slot)
        except Exception:
            self.state = SessionState.ERROR
            raise

    def on_read_complete(self, ident: int, offset: int) -> None:
        self._posted.pop(("read", ident, offset), None)
        self.reads.on_read_complete(ident, offset)

    def fail(self) -> None:
        self.state = SessionState.ERROR

    # --- outputs ----------------------------------------------------------------------------

    def actions(self, *, now: float) -> list[Action]:
        """Everything to post now, in order; ``now`` stamps the posted work for stall detection."""
        if self.state is SessionState.ERROR:
            self._actions.clear()
            return []
        out = self._actions
        self._actions = []
        credits = self.credits
        while self._free_send:
            if self._fins and credits.can_send():
                ident = self._fins.popleft()
                out.append(self._send(MsgKind.FIN, None, now, ident=ident))
            elif self._out and credits.can_send():
                kind, token, length, addr, rkey = self._out.popleft()
                if kind is MsgKind.DATA:
                    out.append(self._send(kind, token, now, length=length))
                elif kind is MsgKind.RTS:
                    out.append(self._send(kind, None, now, ident=token, total=length, addr=addr, rkey=rkey))
                else:
                    action = self._send(kind, None, now)
                    self._close_slot = action.slot
                    out.append(action)
            elif credits.credit_message_due():
                out.append(self._send(MsgKind.CREDIT, None, now))
            else:
                break
        for chunk in self.reads.next_reads():
            self._posted[("read", chunk.ident, chunk.offset)] = now
            out.append(PostRead(chunk))
        return out

    def oldest_posted(self) -> float | None:
        """When the oldest uncompleted SEND or READ was posted (None: nothing outstanding)."""
        return min(self._posted.values(), default=None)

    def idle(self) -> bool:
        """Nothing queued, nothing posted and no rendezvous buffer awaiting its FIN."""
        return not self._out and not self._fins and not self._posted and self.senders.outstanding == 0

    # --- internals --------------------------------------------------------------------------

    def _send(
        self, kind: MsgKind, token: int | None, now: float, *, length: int = 0, ident: int = 0,
        total: int = 0, addr: int = 0, rkey: int = 0,
    ) -> PostSend:  # fmt: skip
        slot = self._free_send.popleft()
        returned = self.credits.consume(credit_only=kind is MsgKind.CREDIT)
        if kind is MsgKind.RTS:
            header = encode_rts(credits=returned, ident=ident, total=total, addr=addr, rkey=rkey)
        else:
            header = encode_header(kind, credits=returned, length=length, ident=ident)
        self._posted[("send", slot, 0)] = now
        return PostSend(slot, header, token)

    def _repost(self, slot: int) -> None:
        if self.state is SessionState.ERROR:
            return
        self._actions.append(PostRecv(slot))
        self.credits.on_reposted()

    def _check_open(self) -> None:
        if self.state is not SessionState.OPEN:
            raise RuntimeError(f"session is {self.state.value}")


def eager_limit(*, peer_slot_bytes: int, send_slot_bytes: int) -> int:
    """Largest eager payload: the smaller slot minus the header."""
    return min(peer_slot_bytes, send_slot_bytes) - K_HEADER_BYTES
