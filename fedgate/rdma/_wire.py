"""The RDMA carrier's wire formats: slot message headers and the connection hello.

Rules of this module:

1. Pure: bytes in, values out. No pyverbs, no asyncio, no clock.
2. Every SEND starts with one fixed 16-byte header (network byte order)::

       kind u8 | flags u8 | credits_returned u16 | length u32 | ident u64

   ``credits_returned`` piggybacks the sender's reposted receive slots on every message (see
   :mod:`._credits`). ``length`` is the eager payload that follows the header (DATA only).
   ``ident`` names a rendezvous transfer (RTS, FIN).
3. An RTS carries a 20-byte tail after the header: ``total u64 | addr u64 | rkey u32``; the receiver
   RDMA-READs ``total`` bytes from ``addr`` with ``rkey`` and answers FIN with the same ``ident``.
4. The hello travels once each way over the control connection as one JSON line; unknown versions
   and missing or out-of-range fields are :class:`~fedgate.errors.RemoteProtocolError`.
5. Anything malformed raises RemoteProtocolError: the peer's fault, only its channel closes.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import asdict, dataclass

from fedgate.errors import RemoteProtocolError

__all__ = [
    "K_HEADER_BYTES",
    "K_HELLO_MAX_BYTES",
    "K_RTS_BYTES",
    "Header",
    "Hello",
    "MsgKind",
    "decode_header",
    "decode_hello",
    "decode_rts",
    "encode_header",
    "encode_hello",
    "encode_rts",
]

K_VERSION = 1
K_HEADER = struct.Struct("!BBHIQ")
K_RTS_TAIL = struct.Struct("!QQI")
K_HEADER_BYTES = K_HEADER.size  # bytes
K_RTS_BYTES = K_HEADER.size + K_RTS_TAIL.size  # bytes
K_HELLO_MAX_BYTES = 4096  # bytes; a longer hello line is a protocol error
K_MAX_CREDITS = 0xFFFF  # slots; the credits_returned field is 16 bits


class MsgKind(enum.IntEnum):
    """What one SEND carries."""

    DATA = 1  # eager message: header + payload in the slot
    CREDIT = 2  # only returns credits; may use the reserved last credit
    RTS = 3  # rendezvous request: READ the message from the sender's registered buffer
    FIN = 4  # rendezvous done: the sender may reuse its buffer
    CLOSE = 5  # orderly end of stream; no message follows


_KINDS = {int(kind): kind for kind in MsgKind}  # a dict lookup: MsgKind(x) costs a microsecond per message


@dataclass(frozen=True, slots=True)
class Header:
    kind: MsgKind
    credits: int
    length: int
    ident: int


def encode_header(kind: MsgKind, *, credits: int, length: int = 0, ident: int = 0) -> bytes:
    if not 0 <= credits <= K_MAX_CREDITS:
        raise ValueError(f"credits {credits} out of range")
    return K_HEADER.pack(kind, 0, credits, length, ident)


def decode_header(data: bytes | memoryview, byte_len: int) -> Header:
    """Parse the header of a received SEND of ``byte_len`` bytes (``data`` holds at least the header)."""
    if byte_len < K_HEADER_BYTES or len(data) < K_HEADER_BYTES:
        raise RemoteProtocolError(f"rdma message of {byte_len} bytes is shorter than its header")
    kind_raw, _flags, credits, length, ident = K_HEADER.unpack_from(data)
    kind = _KINDS.get(kind_raw)
    if kind is None:
        raise RemoteProtocolError(f"unknown rdma message kind {kind_raw}")
    expected = K_HEADER_BYTES + length if kind is MsgKind.DATA else K_RTS_BYTES if kind is MsgKind.RTS else None
    if expected is not None and byte_len != expected:
        raise RemoteProtocolError(f"rdma {kind.name} of {byte_len} bytes, header says {expected}")
    if kind is MsgKind.DATA and length == 0:
        raise RemoteProtocolError("rdma DATA message with an empty payload")
    return Header(kind, credits, length, ident)


def encode_rts(*, credits: int, ident: int, total: int, addr: int, rkey: int) -> bytes:
    return encode_header(MsgKind.RTS, credits=credits, ident=ident) + K_RTS_TAIL.pack(total, addr, rkey)


def decode_rts(data: bytes | memoryview) -> tuple[int, int, int]:
    """``(total, addr, rkey)`` of an RTS whose header was already decoded."""
    total, addr, rkey = K_RTS_TAIL.unpack_from(data, K_HEADER_BYTES)
    if total == 0:
        raise RemoteProtocolError("rdma RTS for an empty message")
    return total, addr, rkey


@dataclass(frozen=True, slots=True)
class Hello:
    """What each end tells the other before the QPs connect."""

    qpn: int
    """Queue pair number of the sender's RC QP."""
    psn: int
    """Initial packet sequence number of the sender's send queue (24 bits)."""
    gid: str
    """The sender's GID, ``xxxx:xxxx:...`` (8 groups of 4 hex digits)."""
    lid: int
    """Port LID (InfiniBand; 0 on RoCE)."""
    mtu: int
    """The sender port's active MTU as an ``ibv_mtu`` enum value (1..5 = 256..4096 bytes)."""
    recv_slots: int
    """Receive slots the sender pre-posted: the other side's credit window."""
    slot_bytes: int
    """Size of each of those slots in bytes: the largest SEND the other side may post."""
    rd_atomic: int
    """RDMA READs the sender accepts in flight as responder (its ``max_dest_rd_atomic``)."""


def encode_hello(hello: Hello) -> bytes:
    return json.dumps({"v": K_VERSION, **asdict(hello)}, separators=(",", ":")).encode() + b"\n"


_LIMITS = {
    "qpn": (1, 0xFFFFFF),
    "psn": (0, 0xFFFFFF),
    "lid": (0, 0xFFFF),
    "mtu": (1, 5),
    "recv_slots": (4, K_MAX_CREDITS),
    "slot_bytes": (K_RTS_BYTES + 1, 1 << 30),
    "rd_atomic": (1, 1 << 16),
}


def decode_hello(line: bytes) -> Hello:
    if len(line) > K_HELLO_MAX_BYTES:
        raise RemoteProtocolError("rdma hello is too long")
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise RemoteProtocolError(f"rdma hello is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("v") != K_VERSION:
        raise RemoteProtocolError(f"rdma hello has an unsupported version: {str(obj)[:80]}")
    values: dict[str, int | str] = {}
    for name, (low, high) in _LIMITS.items():
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise RemoteProtocolError(f"rdma hello field {name}={value!r} is missing or out of range")
        values[name] = value
    gid = obj.get("gid")
    if not isinstance(gid, str) or not _valid_gid(gid):
        raise RemoteProtocolError(f"rdma hello has a malformed gid {gid!r}")
    return Hello(gid=gid, **values)  # type: ignore[arg-type]


def _valid_gid(gid: str) -> bool:
    groups = gid.split(":")
    return len(groups) == 8 and all(len(g) == 4 and all(c in "0123456789abcdefABCDEF" for c in g) for g in groups)
