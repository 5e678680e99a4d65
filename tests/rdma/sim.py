"""A pair of RdmaSession cores joined by a simulated RC QP pair (no device, no clock).

The simulation plays the HCA: a SEND lands in the peer's oldest posted receive slot (none posted is a
receiver-not-ready, which the credit rules must make impossible), an RDMA READ copies from the
peer's announced buffer (which must still be registered), completions come back in order. A seeded
random scheduler interleaves deliveries, completions and the two applications' calls.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from fedgate.rdma._session import (
    EagerMessage,
    EndOfStream,
    LargeMessage,
    PostRead,
    PostRecv,
    PostSend,
    RdmaSession,
    ReleaseSource,
)
from fedgate.rdma._wire import K_RTS_BYTES

K_ADDR_SHIFT = 40  # a rendezvous buffer's fake address is token << K_ADDR_SHIFT


class Deadlock(AssertionError):
    pass


@dataclass
class End:
    name: str
    session: RdmaSession
    slot_bytes: int
    outgoing: deque[bytes]
    max_queued: int
    posted_recv: deque[int] = field(default_factory=deque)
    recv_mem: dict[int, bytes] = field(default_factory=dict)
    payloads: dict[int, bytes] = field(default_factory=dict)
    sources: dict[int, bytes] = field(default_factory=dict)
    sinks: dict[int, bytearray] = field(default_factory=dict)
    send_done: deque[int] = field(default_factory=deque)
    reads: deque[tuple[int, int, int, int]] = field(default_factory=deque)  # ident, offset, length, addr
    wire: deque[bytes] = field(default_factory=deque)  # to the peer
    received: list[bytes] = field(default_factory=list)
    eof: bool = False
    next_token: int = 1
    closing: bool = False
    max_in_flight_sends: int = 0


def make_pair(
    messages_a: list[bytes], messages_b: list[bytes], *, slots: int = 4, slot_bytes: int = 256,
    chunk_bytes: int = 300, max_reads: int = 2, max_rendezvous: int = 2, max_queued: int = 3,
) -> tuple[End, End]:  # fmt: skip
    def session() -> RdmaSession:
        return RdmaSession(
            recv_slots=slots, send_slots=slots, peer_recv_slots=slots, max_eager=slot_bytes - 16,
            chunk_bytes=chunk_bytes, max_reads=max_reads, max_rendezvous=max_rendezvous,
        )  # fmt: skip

    a = End("a", session(), slot_bytes, deque(messages_a), max_queued)
    b = End("b", session(), slot_bytes, deque(messages_b), max_queued)
    return a, b


def pump(end: End, peer: End, now: float) -> None:
    for action in end.session.actions(now=now):
        if isinstance(action, PostRecv):
            end.posted_recv.append(action.slot)
        elif isinstance(action, PostSend):
            data = action.header + (end.payloads.pop(action.token) if action.token is not None else b"")
            assert len(data) <= peer.slot_bytes, "SEND larger than the peer's slot"
            end.wire.append(data)
            end.send_done.append(action.slot)
            end.max_in_flight_sends = max(end.max_in_flight_sends, len(end.send_done))
        elif isinstance(action, PostRead):
            c = action.chunk
            if c.offset == 0:
                end.sinks[c.ident] = bytearray(c.total)
            end.reads.append((c.ident, c.offset, c.length, c.remote_addr))
        elif isinstance(action, ReleaseSource):
            del end.sources[action.token]


def steps(end: End, peer: End) -> list[str]:
    """The moves possible now for ``end`` (its app, its completions, its wire to ``peer``)."""
    out = []
    if end.wire:
        out.append("deliver")
    if end.send_done and len(end.send_done) > len(end.wire):
        out.append("send_complete")  # a SEND completes only once it reached the peer
    if end.reads:
        out.append("read")
    s = end.session
    if end.outgoing and s.queued < end.max_queued:
        big = len(end.outgoing[0]) > s.max_eager
        if not big or s.can_start_rendezvous():
            out.append("queue")
    if not end.outgoing and not end.closing and s.queued == 0:
        out.append("close")
    if not end.eof and s.next_delivery() is not None:
        out.append("consume")
    return out


def step(end: End, peer: End, move: str) -> None:
    s = end.session
    if move == "deliver":
        data = end.wire.popleft()
        assert peer.posted_recv, f"receiver-not-ready at {peer.name}: a SEND found no posted slot"
        slot = peer.posted_recv.popleft()
        peer.recv_mem[slot] = data
        peer.session.on_recv(slot, data[:K_RTS_BYTES], len(data))
    elif move == "send_complete":
        s.on_send_complete(end.send_done.popleft())
    elif move == "read":
        ident, offset, length, addr = end.reads.popleft()
        token, base = addr >> K_ADDR_SHIFT, addr & ((1 << K_ADDR_SHIFT) - 1)
        assert token in peer.sources, "READ from a buffer the peer already released"
        end.sinks[ident][offset : offset + length] = peer.sources[token][base : base + length]
        s.on_read_complete(ident, offset)
    elif move == "queue":
        msg = end.outgoing.popleft()
        token = end.next_token
        end.next_token += 1
        if len(msg) <= s.max_eager:
            end.payloads[token] = msg
            s.queue_eager(token, len(msg))
        else:
            end.sources[token] = msg
            s.queue_rendezvous(token, len(msg), addr=token << K_ADDR_SHIFT, rkey=7)
    elif move == "close":
        end.closing = True
        s.queue_close()
    elif move == "consume":
        d = s.next_delivery()
        assert d is not None
        if isinstance(d, EagerMessage):
            end.received.append(end.recv_mem[d.slot][16 : 16 + d.length])
        elif isinstance(d, LargeMessage):
            end.received.append(bytes(end.sinks.pop(d.ident)))
        elif isinstance(d, EndOfStream):
            end.eof = True
        s.consumed(d)
    else:  # pragma: no cover
        raise ValueError(move)


def run(a: End, b: End, rng: random.Random, *, max_steps: int = 200_000) -> int:
    """Run to both ends' end of stream; returns the step count; Deadlock when nothing can move."""
    now = 0.0
    pump(a, b, now)
    pump(b, a, now)
    for n in range(max_steps):
        if a.eof and b.eof and not a.wire and not b.wire:
            return n
        moves = [(a, b, m) for m in steps(a, b)] + [(b, a, m) for m in steps(b, a)]
        if not moves:
            raise Deadlock(
                f"stuck after {n} steps: a={a.session.credits.statistics()} b={b.session.credits.statistics()}"
            )
        end, peer, move = rng.choice(moves)
        step(end, peer, move)
        now += 1.0
        pump(end, peer, now)
        pump(peer, end, now)
    raise Deadlock(f"no end after {max_steps} steps")
