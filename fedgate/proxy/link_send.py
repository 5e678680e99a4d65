"""The sending end of a link connection (sans-IO): messages out in order, within credit; acks in.

Rules of this module:

1. Messages go out in the order they were offered, each as one or more MSG frames of at most
   ``chunk_bytes``; the chunks of one message are contiguous on the wire. The first frame of a message
   on a connection (and the first after a rewind or a skip) carries its envelope header ``e``.
2. A frame costs ``len(payload) + K_FRAME_CHARGE`` of credit; nothing is sent beyond the credit the
   receiver granted (HELLO ``w`` plus CREDIT frames).
3. A message stays in :attr:`LinkSenderCore.unacked` until the receiver ACKs it (stored, duplicate or
   rejected). The adapter drops it from the outbox only on :class:`MessagesAcked`.
4. Resume: ``offer(..., resume_offset=n)`` starts a message at byte ``n`` (what the receiver
   reported staged on an earlier connection). PROGRESS ``o`` beyond the send cursor skips ahead;
   RESUME ``o`` rewinds that message to ``o`` and resends every later unacked message (go-back-N:
   the receiver discards frames until it sees the one it asked for, which keeps order).
5. Payloads are never copied: frames reference ``memoryview`` slices of the offered payload.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from fedgate.errors import LocalError
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import K_FRAME_CHARGE, LinkCore, LinkParams, LinkProtocolViolation, LinkState
from fedgate.proxy.link_events import (
    ChunkStored,
    LinkEvent,
    MessagesAcked,
    Rejection,
)
from fedgate.proxy.link_frames import (
    ACK,
    CREDIT,
    HELLO,
    MSG,
    PROGRESS,
    RESUME,
    Frame,
    envelope_header,
    get_int,
    get_list,
    get_str,
)

__all__ = ["LinkSenderCore"]


@dataclass(slots=True, eq=False)
class _Outgoing:
    message_id: str
    header: dict[str, Any]
    payload: memoryview
    resume_at: int
    """Bytes the receiver reported durably staged (PROGRESS)."""
    next_off: int
    """Send cursor."""
    started: bool = False
    """Whether ``e`` went out since the last (re)start of this message."""
    sent_all: bool = False
    """Whether its last frame went out (since the last rewind)."""


class LinkSenderCore(LinkCore):
    """One connection's sending end. ``expected_peer`` is the party the route says we reach."""

    role = "sender"
    peer_role = "receiver"

    def __init__(
        self, params: LinkParams, *, now: float, expected_peer: str, authenticated_peer: str | None = None,
        wall_time: float | None = None,
    ) -> None:
        super().__init__(params, now=now, expected_peer=expected_peer, authenticated_peer=authenticated_peer,
                         wall_time=wall_time)
        self.credit = 0
        self.peer_max_message = 0
        """Largest payload the receiver accepts (HELLO ``m``), known once OPEN."""
        self.bytes_sent = 0
        self.messages_sent = 0
        self._unacked: dict[str, _Outgoing] = {}
        self._to_send: deque[_Outgoing] = deque()

    # -- the adapter's calls ----------------------------------------------------------------------------

    def offer(self, envelope: Envelope, *, resume_offset: int = 0) -> None:
        """Queue a message for sending (also before the handshake); tracked until acknowledged."""
        if self.state in (LinkState.ERROR, LinkState.CLOSED):
            raise LocalError(f"cannot offer: the link is {self.state.value}")
        try:
            if envelope.message_id in self._unacked:
                raise ValueError(f"message {envelope.message_id} offered twice")
            if not 0 <= resume_offset <= envelope.size:
                raise ValueError(f"resume offset {resume_offset} outside 0..{envelope.size}")
            out = _Outgoing(
                envelope.message_id, envelope_header(envelope), memoryview(envelope.payload),
                resume_at=resume_offset, next_off=resume_offset,
            )
        except Exception as exc:
            self._fail(LocalError(str(exc)), [])
            raise LocalError(str(exc)) from exc
        self._unacked[envelope.message_id] = out
        self._to_send.append(out)

    @property
    def unacked(self) -> int:
        """Messages offered and not yet acknowledged."""
        return len(self._unacked)

    @property
    def unsent(self) -> int:
        """Messages offered whose last frame has not gone out yet."""
        return len(self._to_send)

    @property
    def unsent_bytes(self) -> int:
        """Payload bytes offered and not sent yet."""
        return sum(len(m.payload) - m.next_off for m in self._to_send)

    @property
    def blocked_on_credit(self) -> bool:
        return bool(self._to_send) and self._next_charge(self._to_send[0]) > self.credit

    # -- output -----------------------------------------------------------------------------------------

    def _next_charge(self, m: _Outgoing) -> int:
        return min(self.chunk_bytes, len(m.payload) - m.next_off) + K_FRAME_CHARGE

    def _prepare_output(self) -> None:
        if self.state is not LinkState.OPEN:
            return
        chunk = self.chunk_bytes
        while self._to_send:
            m = self._to_send[0]
            total = len(m.payload)
            n = min(chunk, total - m.next_off)
            if n + K_FRAME_CHARGE > self.credit:
                break
            header: dict[str, Any] = {"i": m.message_id, "o": m.next_off, "n": total}
            if not m.started:
                header["e"] = m.header
                m.started = True
            self._emit(MSG, header, m.payload[m.next_off : m.next_off + n])
            self.credit -= n + K_FRAME_CHARGE
            self.bytes_sent += n
            m.next_off += n
            if m.next_off == total:
                self._to_send.popleft()
                m.sent_all = True
                self.messages_sent += 1

    # -- input ------------------------------------------------------------------------------------------

    def _on_handshake(self, h: dict[str, Any]) -> None:
        self.credit = get_int(h, "w", HELLO, lo=0, hi=2**40)
        self.peer_max_message = get_int(h, "m", HELLO, lo=0, hi=2**62)
        if self.credit < self.chunk_bytes + K_FRAME_CHARGE:
            raise LinkProtocolViolation(f"receiver window {self.credit} cannot hold one chunk of {self.chunk_bytes}")

    def _on_frame(self, frame: Frame, now: float, events: list[LinkEvent]) -> None:
        h = frame.header
        if frame.type == ACK:
            self._on_ack(h, events)
        elif frame.type == CREDIT:
            self.credit += get_int(h, "c", CREDIT, lo=1, hi=2**40)
            if self.credit > 2**40:
                raise LinkProtocolViolation("credit overflow")
        elif frame.type == PROGRESS:
            mid = get_str(h, "i", PROGRESS)
            m = self._known(mid, PROGRESS)
            offset = get_int(h, "o", PROGRESS, hi=len(m.payload))
            m.resume_at = max(m.resume_at, offset)
            events.append(ChunkStored(mid, m.resume_at))
            if self._to_send and self._to_send[0] is m and offset > m.next_off:
                m.next_off = offset  # the receiver has more than we sent on this connection: skip ahead
                m.started = False
        elif frame.type == RESUME:
            mid = get_str(h, "i", RESUME)
            m = self._known(mid, RESUME)
            offset = get_int(h, "o", RESUME, hi=len(m.payload))
            self._rewind(m, offset)
        else:
            raise LinkProtocolViolation(f"a link sender does not accept frame type {frame.type}")

    def _known(self, mid: str, ftype: int) -> _Outgoing:
        m = self._unacked.get(mid)
        if m is None:
            raise LinkProtocolViolation(f"frame type {ftype} names message {mid!r}, which is not in flight")
        return m

    def _on_ack(self, h: dict[str, Any], events: list[LinkEvent]) -> None:
        acked: list[str] = []
        rejected: list[Rejection] = []
        size = 0
        for mid in get_list(h, "a", ACK, default=[]):
            if not isinstance(mid, str):
                raise LinkProtocolViolation("ACK ids must be strings")
            size += self._settle(mid)
            acked.append(mid)
        for item in get_list(h, "r", ACK, default=[]):
            if not (isinstance(item, list) and len(item) == 3 and all(isinstance(x, str) for x in item)):
                raise LinkProtocolViolation("ACK rejections must be [id, rule, detail] strings")
            size += self._settle(item[0])
            rejected.append(Rejection(item[0], item[1][:1000], item[2][:4000]))
        if acked or rejected:
            events.append(MessagesAcked(tuple(acked), tuple(rejected), size))

    def _settle(self, mid: str) -> int:
        m = self._unacked.pop(mid, None)
        if m is None:
            raise LinkProtocolViolation(f"ACK for message {mid!r}, which is not in flight")
        if not m.sent_all:
            raise LinkProtocolViolation(f"ACK for message {mid!r} before its last chunk was sent")
        return len(m.payload)

    def _rewind(self, m: _Outgoing, offset: int) -> None:
        """Go back to ``m`` at ``offset``; every later unacked message is sent again (rule 4)."""
        ids = list(self._unacked)
        later = [self._unacked[mid] for mid in ids[ids.index(m.message_id) :]]
        for other in later:
            other.next_off = other.resume_at
            other.started = False
            other.sent_all = False
        m.next_off = offset
        m.resume_at = min(m.resume_at, offset)
        self._to_send = deque(later)
