"""The store seams the link protocol and the fronts code against.

The SQLite implementation lives in :mod:`fedgate.proxy.store`; tests may use the in-memory one in
:mod:`fedgate.proxy.testing`. Every method that returns may be relied upon: once ``put`` or
``deliver`` returns, the message is durable.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol

from fedgate.proxy.envelope import Envelope

__all__ = ["Inbox", "Lane", "Outbox", "OutboxItem", "lane_key"]


def lane_key(session_id: str, topic: str) -> int:
    """The stable 32-bit key that picks a message's lane: CRC-32 of its (session, topic)."""
    return zlib.crc32(f"{session_id}\x00{topic}".encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class Lane:
    """One of ``count`` lanes to a peer: the messages whose ``lane_key % count == index``.

    Every message of one (session, topic) is in the same lane, so a lane keeps the order the
    destination queues promise while the lanes of a peer run side by side (``link.lanes_per_peer``).
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"lane {self.index} of {self.count}: need 0 <= index < count")

    def owns(self, key: int) -> bool:
        return key % self.count == self.index


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A message waiting in the outbox for a peer gateway."""

    seq: int
    """Outbox sequence number, increasing per gateway; order of delivery."""
    peer: str
    """Destination party id (the link is chosen by the route to it)."""
    envelope: Envelope
    enqueued_at: float
    """Wall-clock seconds since the epoch when it entered the outbox."""


class Outbox(Protocol):
    """Durable messages waiting to be acknowledged by a peer gateway."""

    async def put(self, peer: str, envelope: Envelope) -> int:
        """Append durably; returns the outbox seq. Raises StoreFullError / MessageTooLargeError."""

    async def pending(self, peer: str, *, after_seq: int, limit: int) -> list[OutboxItem]:
        """Up to ``limit`` unacknowledged items for ``peer`` with seq > ``after_seq``, in seq order."""

    async def wait_pending(self, peer: str, *, after_seq: int, timeout: float) -> bool:
        """Wait until an item with seq > after_seq exists for peer (True) or timeout passes (False)."""

    async def ack(self, peer: str, message_ids: list[str]) -> None:
        """The peer has stored these messages durably: drop them from the outbox."""


class Inbox(Protocol):
    """The receiving side: durable, deduplicated delivery into local queues."""

    async def deliver(self, envelope: Envelope) -> bool:
        """Store durably into the destination queue unless already seen (by message_id).

        Returns True if stored now, False if it was a duplicate. Raises StoreFullError when the
        store cannot take it (the link must then hold back and retry, never drop).
        """

    async def partial_size(self, message_id: str) -> int:
        """Bytes of ``message_id``'s payload received and staged so far (0 if none)."""

    async def append_partial(self, message_id: str, offset: int, chunk: bytes) -> None:
        """Stage ``chunk`` at ``offset`` of a large payload; offset must equal partial_size."""

    async def take_partial(self, message_id: str) -> bytes:
        """Return and forget the staged payload once the last chunk has arrived."""
