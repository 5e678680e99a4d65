"""The Envelope: one federated message inside fedgate.

Every front end turns its protocol into Envelopes; every queue, outbox and link carries them. An
Envelope is immutable; ``message_id`` is unique and stable across retries and hops, which is what
lets the receiver deduplicate.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Envelope", "Protocol", "new_message_id"]

Protocol = Literal["osx", "rollsite"]


def new_message_id() -> str:
    """A fresh, globally unique message id (random UUID, hex)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Envelope:
    """One federated message.

    For OSX queue mode ``payload`` is exactly the ``PushInbound.payload`` bytes (a serialized
    ``org.ppc.ptp.Message``: msgId, JSON head, FATE object body) and is handed back unchanged on pop.
    For rollsite mode it is the serialized ``Packet``.
    """

    message_id: str
    """Unique id, stable across retries and hops."""
    session_id: str
    """FATE federation session id (``x-ptp-session-id``)."""
    topic: str
    """Queue topic; queues are keyed by (session_id, topic)."""
    src_party: str
    """Sending party id."""
    dst_party: str
    """Destination party id."""
    payload: bytes
    """The message bytes, opaque to routing."""
    src_role: str = ""
    dst_role: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Protocol headers carried along (the ``x-ptp-*`` gRPC metadata)."""
    protocol: Protocol = "osx"
    created_at: float = 0.0
    """Wall-clock time (seconds since the epoch) when the first gateway accepted it."""

    @property
    def size(self) -> int:
        return len(self.payload)
