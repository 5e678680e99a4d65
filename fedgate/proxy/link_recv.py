"""The receiving end of a link connection (sans-IO): MSG frames in; acks, progress, credit out.

Rules of this module:

1. The core checks the wire: a message begins with a frame carrying ``e`` and continues with
   contiguous offsets; a new message may not begin while another is incomplete; offsets never pass
   the announced total; the sender never exceeds the credit it was granted. Any breach is a
   protocol error that closes this link only.
2. Staging, dedup and delivery are the adapter's (they need the store); the adapter reports back
   with :meth:`LinkReceiverCore.ack` / ``reject`` / ``progress`` / ``resume`` / ``release``.
   :func:`plan_chunk` is the pure rule for placing a chunk against what the store already holds.
3. Credit: every frame's charge is returned (CREDIT) only after :meth:`release`, i.e. after the
   adapter handled the chunk durably. A receiver that cannot store (disk full) simply does not
   release: the sender stops when its credit runs out, and nothing is dropped.
4. After :meth:`resume`, frames are discarded (their credit returned at once) until the asked-for
   frame arrives; the sender resends everything from there, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import K_FRAME_CHARGE, LinkCore, LinkParams, LinkProtocolViolation, LinkState
from fedgate.proxy.link_events import ChunkReceived, LinkEvent
from fedgate.proxy.link_frames import (
    ACK,
    CREDIT,
    MSG,
    PROGRESS,
    RESUME,
    Frame,
    envelope_from_header,
    get_int,
    get_str,
)

__all__ = ["ChunkPlan", "LinkReceiverCore", "plan_chunk"]


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """What to do with a chunk at ``offset`` when the store holds ``have`` bytes of the message."""

    append: memoryview | None
    """Bytes to append at ``have`` (the chunk minus what is already staged), or None."""
    resume: bool
    """The chunk starts beyond ``have``: ask the sender to rewind to ``have``."""
    hint: bool
    """The store holds more than the chunk reaches: tell the sender (PROGRESS) so it skips ahead."""


def plan_chunk(*, have: int, offset: int, data: bytes) -> ChunkPlan:
    """Place a chunk against the ``have`` bytes already staged (rule 2)."""
    end = offset + len(data)
    if offset > have:
        return ChunkPlan(None, resume=True, hint=False)
    if end <= have:
        return ChunkPlan(None, resume=False, hint=end < have)
    return ChunkPlan(memoryview(data)[have - offset :], resume=False, hint=False)


@dataclass(slots=True)
class _Incoming:
    envelope: Envelope
    total: int
    next_off: int


class LinkReceiverCore(LinkCore):
    """One connection's receiving end. Any party may connect; the adapter checks it is allowed."""

    role = "receiver"
    peer_role = "sender"

    def __init__(
        self, params: LinkParams, *, now: float, authenticated_peer: str | None = None, wall_time: float | None = None
    ) -> None:
        super().__init__(params, now=now, authenticated_peer=authenticated_peer, wall_time=wall_time)
        self.outstanding = 0
        """Credit the sender has used and we have not returned yet, in bytes."""
        self.bytes_received = 0
        self._to_grant = 0
        self._cur: _Incoming | None = None
        self._waiting: tuple[str, int] | None = None
        self._acks: list[str] = []
        self._rejects: list[list[str]] = []

    # -- the adapter's calls ----------------------------------------------------------------------------

    def ack(self, message_id: str) -> None:
        """``message_id`` is durably stored (or was a duplicate)."""
        self._check_open("ack")
        self._acks.append(message_id)

    def reject(self, message_id: str, *, rule: str, detail: str) -> None:
        """``message_id`` was refused by the inbound audit; final."""
        self._check_open("reject")
        self._rejects.append([message_id, rule, detail])

    def progress(self, message_id: str, offset: int) -> None:
        """``offset`` bytes of ``message_id`` are durably staged."""
        self._check_open("report progress")
        self._emit(PROGRESS, {"i": message_id, "o": offset})

    def resume(self, message_id: str, offset: int) -> None:
        """Ask the sender to resend ``message_id`` from ``offset`` (and everything after it)."""
        self._check_open("ask to resume")
        self._waiting = (message_id, offset)
        self._emit(RESUME, {"i": message_id, "o": offset})

    def release(self, charge: int) -> None:
        """Return the credit of a handled frame (``ChunkReceived.charge``)."""
        if charge < 0 or charge > self.outstanding:
            raise ValueError(f"release of {charge} bytes but only {self.outstanding} are outstanding")
        self.outstanding -= charge
        self._to_grant += charge

    # -- output -----------------------------------------------------------------------------------------

    def _prepare_output(self) -> None:
        if self.state not in (LinkState.OPEN, LinkState.CLOSING):
            return
        if self._acks or self._rejects:
            header: dict[str, Any] = {}
            if self._acks:
                header["a"] = self._acks
            if self._rejects:
                header["r"] = self._rejects
            self._emit(ACK, header)
            self._acks, self._rejects = [], []
        # Batch CREDIT frames, but never sit on credit while the sender may be waiting for it.
        if self._to_grant and (self._to_grant >= self.params.window_bytes // 16 or self.outstanding == 0):
            self._emit(CREDIT, {"c": self._to_grant})
            self._to_grant = 0

    # -- input ------------------------------------------------------------------------------------------

    def _on_frame(self, frame: Frame, now: float, events: list[LinkEvent]) -> None:
        if frame.type != MSG:
            raise LinkProtocolViolation(f"a link receiver does not accept frame type {frame.type}")
        h, data = frame.header, frame.payload
        charge = len(data) + K_FRAME_CHARGE
        self.outstanding += charge
        if self.outstanding > self.params.window_bytes:
            raise LinkProtocolViolation(
                f"sender exceeded its credit: {self.outstanding} bytes outstanding, window {self.params.window_bytes}"
            )
        mid = get_str(h, "i", MSG)
        offset = get_int(h, "o", MSG, hi=self.params.max_message_bytes)
        total = get_int(h, "n", MSG, hi=self.params.max_message_bytes)
        if offset + len(data) > total:
            raise LinkProtocolViolation(f"MSG {mid}: chunk at {offset}+{len(data)} passes the total {total}")
        if self._waiting is not None:
            if "e" in h and (mid, offset) == self._waiting:
                self._waiting = None
            else:
                self.release(charge)  # discarded while waiting for the rewind (rule 4)
                return
        self.bytes_received += len(data)
        cur = self._cur
        if "e" in h:
            if cur is not None and cur.envelope.message_id != mid:
                raise LinkProtocolViolation(
                    f"MSG {mid} began while message {cur.envelope.message_id} was incomplete"
                )
            cur = self._cur = _Incoming(envelope_from_header(mid, h["e"]), total, offset)
            first = True
        else:
            if cur is None or cur.envelope.message_id != mid:
                raise LinkProtocolViolation(f"MSG {mid} continues a message that did not begin")
            if offset != cur.next_off or total != cur.total:
                raise LinkProtocolViolation(
                    f"MSG {mid}: chunk at {offset} of {total}, expected {cur.next_off} of {cur.total}"
                )
            first = False
        cur.next_off = offset + len(data)
        if cur.next_off == total:
            self._cur = None
        events.append(ChunkReceived(cur.envelope, offset, total, data, first, charge))
        self._pause = True  # the adapter's answer (resume) decides how the next frames are read
