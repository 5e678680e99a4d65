"""Rendezvous transfers: large messages moved by RDMA READ, chunked, with bounded reads in flight.

Rules of this module:

1. Pure: no pyverbs, no clock. Buffers are named by opaque ids; the adapter maps them to memory.
2. The sender copies a large message into a registered buffer and announces it with an RTS
   (``ident``, ``total``, ``addr``, ``rkey``). The receiver READs it in chunks of at most
   ``chunk_bytes`` into a local buffer, at most ``max_reads`` READs in flight per channel, oldest
   transfer first. When the receiver has handed the message to its application it sends FIN; only
   then may the sender reuse its buffer. FIN after consumption (not after the READ) makes the
   sender's ``max_rendezvous`` bound the receiver's pinned memory too.
3. Transfer states, receiver side: ANNOUNCED -> READING -> COMPLETE -> (delivered, forgotten).
   Sender side: POSTED -> (FIN) released. A FIN for an unknown ident is the peer's protocol error.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from fedgate.errors import RemoteProtocolError

__all__ = ["InboundTransfer", "ReadChunk", "ReadScheduler", "RendezvousSenders", "TransferState", "plan_chunks"]


def plan_chunks(total: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` pieces covering ``total`` bytes, each at most ``chunk_bytes``."""
    if total <= 0 or chunk_bytes <= 0:
        raise ValueError("total and chunk_bytes must be positive")
    for offset in range(0, total, chunk_bytes):
        yield offset, min(chunk_bytes, total - offset)


class TransferState(enum.Enum):
    ANNOUNCED = "announced"
    READING = "reading"
    COMPLETE = "complete"


@dataclass(frozen=True, slots=True)
class ReadChunk:
    """One RDMA READ to post: ``length`` bytes from ``remote_addr`` into ``offset`` of the local buffer."""

    ident: int
    offset: int
    length: int
    remote_addr: int
    rkey: int
    total: int
    """Size of the whole transfer; the adapter allocates the local buffer on the first chunk."""


@dataclass(slots=True)
class InboundTransfer:
    ident: int
    total: int
    addr: int
    rkey: int
    next_offset: int = 0
    reads_in_flight: int = 0
    done_bytes: int = 0
    state: TransferState = TransferState.ANNOUNCED
    chunk_lengths: dict[int, int] = field(default_factory=dict)


class ReadScheduler:
    """The receiver's side: announced transfers, their READs, their completion."""

    def __init__(self, *, chunk_bytes: int, max_reads: int) -> None:
        if chunk_bytes <= 0 or max_reads <= 0:
            raise ValueError("chunk_bytes and max_reads must be positive")
        self._chunk = chunk_bytes
        self._max_reads = max_reads
        self._in_flight = 0
        self._transfers: dict[int, InboundTransfer] = {}
        self._order: deque[int] = deque()  # transfers with chunks not yet requested, oldest first

    @property
    def reads_in_flight(self) -> int:
        return self._in_flight

    def announce(self, *, ident: int, total: int, addr: int, rkey: int) -> InboundTransfer:
        if ident in self._transfers:
            raise RemoteProtocolError(f"rdma RTS reuses transfer id {ident}")
        transfer = InboundTransfer(ident, total, addr, rkey)
        self._transfers[ident] = transfer
        self._order.append(ident)
        return transfer

    def next_reads(self) -> list[ReadChunk]:
        """READs to post now, within the in-flight bound."""
        out: list[ReadChunk] = []
        while self._order and self._in_flight < self._max_reads:
            t = self._transfers[self._order[0]]
            length = min(self._chunk, t.total - t.next_offset)
            out.append(ReadChunk(t.ident, t.next_offset, length, t.addr + t.next_offset, t.rkey, t.total))
            t.chunk_lengths[t.next_offset] = length
            t.next_offset += length
            t.reads_in_flight += 1
            t.state = TransferState.READING
            self._in_flight += 1
            if t.next_offset >= t.total:
                self._order.popleft()
        return out

    def on_read_complete(self, ident: int, offset: int) -> InboundTransfer:
        t = self._transfers.get(ident)
        if t is None or offset not in t.chunk_lengths:
            raise RuntimeError(f"completion for unknown READ {ident}@{offset}")  # our own bookkeeping
        t.done_bytes += t.chunk_lengths.pop(offset)
        t.reads_in_flight -= 1
        self._in_flight -= 1
        if t.done_bytes == t.total:
            t.state = TransferState.COMPLETE
        return t

    def get(self, ident: int) -> InboundTransfer:
        return self._transfers[ident]

    def forget(self, ident: int) -> None:
        """The message was delivered; its FIN goes out."""
        if self._transfers[ident].state is not TransferState.COMPLETE:
            raise RuntimeError(f"transfer {ident} forgotten before it completed")
        del self._transfers[ident]

    def pending(self) -> int:
        return len(self._transfers)


class RendezvousSenders:
    """The sender's side: announced buffers awaiting FIN, bounded by ``max_outstanding``."""

    def __init__(self, *, max_outstanding: int) -> None:
        if max_outstanding <= 0:
            raise ValueError("max_outstanding must be positive")
        self._max = max_outstanding
        self._next_ident = 1
        self._outstanding: dict[int, int] = {}  # ident -> the adapter's buffer token

    def has_room(self) -> bool:
        return len(self._outstanding) < self._max

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def start(self, token: int) -> int:
        """Register a buffer about to be announced; returns the transfer ident."""
        if not self.has_room():
            raise RuntimeError("too many rendezvous transfers in flight")
        ident = self._next_ident
        self._next_ident += 1
        self._outstanding[ident] = token
        return ident

    def finish(self, ident: int) -> int:
        """The peer sent FIN for ``ident``; returns the buffer token to release."""
        token = self._outstanding.pop(ident, None)
        if token is None:
            raise RemoteProtocolError(f"rdma FIN for unknown transfer {ident}")
        return token

    def tokens(self) -> list[int]:
        return list(self._outstanding.values())
