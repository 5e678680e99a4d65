"""Events the link protocol cores hand to their adapters, and the small values they carry.

Rules of this module: frozen dataclasses only, no behaviour. A core returns a list of these from
``receive_data`` / ``handle_timer``; the adapter acts on each in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedgate.errors import FedgateError
from fedgate.proxy.envelope import Envelope

__all__ = [
    "ChunkReceived",
    "ChunkStored",
    "ConnectionTerminated",
    "HandshakeCompleted",
    "LinkEvent",
    "MessagesAcked",
    "Rejection",
    "RttMeasured",
]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message refused by the receiver's inbound audit; final, never retried."""

    message_id: str
    rule: str
    detail: str


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """Both HELLOs were exchanged and accepted."""

    peer_party: str
    version: int
    capabilities: frozenset[str]
    chunk_bytes: int
    """Negotiated largest payload chunk, in bytes."""
    peer_wall_time: float | None = None
    """The peer's wall clock when it sent HELLO (seconds since the epoch), if it said."""


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """Receiver side: one MSG frame, in wire order.

    ``envelope`` has an empty payload; it is the header sent with the first frame of the message on
    this connection. ``charge`` is the credit the frame consumed: hand it back with ``release``
    once the chunk is durably handled.
    """

    envelope: Envelope
    offset: int
    total: int
    data: bytes
    first: bool
    """First frame of this message on this connection (or after a rewind)."""
    charge: int

    @property
    def last(self) -> bool:
        return self.offset + len(self.data) == self.total

    @property
    def whole(self) -> bool:
        """The frame carries the complete payload: no staging needed."""
        return self.offset == 0 and len(self.data) == self.total


@dataclass(frozen=True, slots=True)
class MessagesAcked:
    """Sender side: the peer stored these messages durably (or found them duplicate) or rejected them."""

    message_ids: tuple[str, ...]
    rejected: tuple[Rejection, ...]
    acked_bytes: int
    """Payload bytes of the acknowledged and rejected messages."""


@dataclass(frozen=True, slots=True)
class ChunkStored:
    """Sender side: the peer has ``offset`` bytes of ``message_id`` staged durably (resume point)."""

    message_id: str
    offset: int


@dataclass(frozen=True, slots=True)
class RttMeasured:
    rtt: float
    """Round-trip time of a PING, in seconds."""


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over; the adapter flushes ``data_to_send`` one last time and closes."""

    code: str
    """``normal``, ``shutdown``, ``protocol_error``, ``timeout``, ``unauthorized``, ``version``."""
    reason: str
    by_peer: bool
    error: FedgateError | None = None


LinkEvent = (
    HandshakeCompleted | ChunkReceived | MessagesAcked | ChunkStored | RttMeasured | ConnectionTerminated
)
