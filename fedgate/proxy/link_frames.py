"""Wire format of the fedgate link protocol: frames with a msgpack header and a raw payload.

Rules of this module:

1. Pure: no I/O, no clock. Encoding returns bytes; decoding is incremental (:class:`FrameDecoder`).
2. A frame is ``prefix | header | payload``. The prefix is 7 bytes, big-endian: frame type (u8),
   header length (u16), payload length (u32). The header is a msgpack map with short string keys;
   the payload is raw bytes (message chunks only), never copied into msgpack.
3. Every size is capped *before* buffering: a header over :data:`K_MAX_HEADER` or a payload over the
   decoder's ``max_payload`` is a :class:`~fedgate.errors.RemoteProtocolError`, so a hostile peer can
   never make us buffer more than one maximal frame.
4. Header fields are validated here by the typed getters (``get_str``/``get_int``/...); a missing or
   mistyped field is a RemoteProtocolError naming the frame type and the key.

Frame types (``h`` = header keys):

=========  ==  ====================================================================================
HELLO       1  ``magic`` "fedgate-link", ``v`` [versions], ``party``, ``role`` "sender"|"receiver",
               ``caps`` [str], ``k`` max chunk bytes, ``w`` initial credit (receiver), ``ka`` keepalive s,
               ``m`` largest message payload accepted, bytes
MSG         2  ``i`` message id, ``o`` offset, ``n`` total size, ``e`` envelope header (first frame
               of a message on a connection, or after a rewind); payload = the chunk
ACK         3  ``a`` [ids stored or duplicate], ``r`` [[id, rule, detail]] rejected by the audit
PROGRESS    4  ``i`` id, ``o`` bytes of the payload durably staged by the receiver
RESUME      5  ``i`` id, ``o`` offset: the receiver lacks bytes before ``o``; resend from there
CREDIT      6  ``c`` bytes of additional credit
PING        7  ``t`` opaque number, echoed
PONG        8  ``t`` the PING's number
CLOSE       9  ``code`` short reason code, ``reason`` text
=========  ==  ====================================================================================
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from fedgate.errors import MessageTooLargeError, RemoteProtocolError
from fedgate.proxy.envelope import Envelope

__all__ = [
    "ACK",
    "CLOSE",
    "CREDIT",
    "FRAME_NAMES",
    "HELLO",
    "K_MAGIC",
    "K_MAX_HEADER",
    "K_PREFIX_SIZE",
    "MSG",
    "PING",
    "PONG",
    "PROGRESS",
    "RESUME",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "envelope_from_header",
    "envelope_header",
    "get_float",
    "get_int",
    "get_list",
    "get_str",
]

HELLO, MSG, ACK, PROGRESS, RESUME, CREDIT, PING, PONG, CLOSE = range(1, 10)
FRAME_NAMES = {
    HELLO: "HELLO", MSG: "MSG", ACK: "ACK", PROGRESS: "PROGRESS", RESUME: "RESUME",
    CREDIT: "CREDIT", PING: "PING", PONG: "PONG", CLOSE: "CLOSE",
}

K_MAGIC = "fedgate-link"
K_MAX_HEADER = 65535  # bytes; the u16 header length field
K_MAX_ID = 256  # characters of a message id, party id, session or topic
K_MAX_FIELD = 64 * 1024  # characters of any other string in a header

_PREFIX = struct.Struct("!BHI")
K_PREFIX_SIZE = _PREFIX.size  # bytes


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    type: int
    header: dict[str, Any]
    payload: bytes


def encode_frame(ftype: int, header: Mapping[str, Any] | None = None, payload_len: int = 0) -> bytes:
    """The prefix and header of a frame; the caller sends ``payload_len`` payload bytes after it."""
    hdr = msgpack.packb(header, use_bin_type=True) if header else b""
    if len(hdr) > K_MAX_HEADER:
        raise ValueError(f"{FRAME_NAMES.get(ftype, ftype)} header of {len(hdr)} bytes exceeds {K_MAX_HEADER}")
    return _PREFIX.pack(ftype, len(hdr), payload_len) + hdr


class FrameDecoder:
    """Incremental decoder; :meth:`feed` bytes, then take complete frames from :meth:`next_frame`.

    Memory is bounded by one maximal frame plus the last ``feed``: :meth:`feed` refuses data that would
    grow the buffer past ``K_PREFIX_SIZE + K_MAX_HEADER + max_payload`` plus the size of that feed.
    """

    def __init__(self, *, max_payload: int) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < K_PREFIX_SIZE:
            return None
        ftype, hlen, plen = _PREFIX.unpack_from(buf, pos)
        if ftype not in FRAME_NAMES:
            raise RemoteProtocolError(f"unknown frame type {ftype}")
        if plen > self.max_payload:
            raise RemoteProtocolError(
                f"{FRAME_NAMES[ftype]} payload of {plen} bytes exceeds the limit of {self.max_payload}"
            )
        if plen and ftype != MSG:
            raise RemoteProtocolError(f"{FRAME_NAMES[ftype]} frame must not carry a payload")
        end = pos + K_PREFIX_SIZE + hlen + plen
        if len(buf) < end:
            return None
        hstart = pos + K_PREFIX_SIZE
        header: dict[str, Any] = {}
        if hlen:
            header = _unpack_header(ftype, memoryview(buf)[hstart : hstart + hlen])
        payload = bytes(memoryview(buf)[hstart + hlen : end]) if plen else b""
        self._pos = end
        if end == len(buf):
            buf.clear()
            self._pos = 0
        return Frame(ftype, header, payload)


def _unpack_header(ftype: int, data: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_bin_len=K_MAX_HEADER, max_str_len=K_MAX_HEADER,
            max_array_len=K_MAX_HEADER, max_map_len=K_MAX_HEADER, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, FormatError, ...)
        raise RemoteProtocolError(f"{FRAME_NAMES[ftype]} header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise RemoteProtocolError(f"{FRAME_NAMES[ftype]} header is not a map")
    return header


# -- typed header getters ------------------------------------------------------------------------------


def _bad(ftype: int, key: str, what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{FRAME_NAMES.get(ftype, ftype)} frame: field {key!r} {what}")


def get_str(h: Mapping[str, Any], key: str, ftype: int, *, max_len: int = K_MAX_ID, default: str | None = None) -> str:
    value = h.get(key, default)
    if not isinstance(value, str):
        raise _bad(ftype, key, "must be a string")
    if len(value) > max_len:
        raise _bad(ftype, key, f"is longer than {max_len} characters")
    return value


def get_int(h: Mapping[str, Any], key: str, ftype: int, *, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = h.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(ftype, key, "must be an integer")
    if not lo <= value <= hi:
        raise _bad(ftype, key, f"= {value} is outside {lo}..{hi}")
    return value


def get_float(h: Mapping[str, Any], key: str, ftype: int) -> float:
    value = h.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        raise _bad(ftype, key, "must be a number")
    return float(value)


def get_list(h: Mapping[str, Any], key: str, ftype: int, *, default: list[Any] | None = None) -> list[Any]:
    value = h.get(key, default)
    if not isinstance(value, list):
        raise _bad(ftype, key, "must be an array")
    return value


# -- the envelope header carried by the first MSG frame of a message --------------------------------------


def envelope_header(env: Envelope) -> dict[str, Any]:
    """The envelope's fields without its payload, as a msgpack-ready map."""
    return {
        "s": env.session_id, "t": env.topic, "sp": env.src_party, "dp": env.dst_party,
        "sr": env.src_role, "dr": env.dst_role, "m": dict(env.metadata), "p": env.protocol,
        "c": env.created_at,
    }


def check_sendable(env: Envelope, *, max_message_bytes: int) -> None:
    """Raise MessageTooLargeError if the receiver would refuse ``env``'s MSG header or size.

    Runs the receiver's own parser on the encoded header, so both ends apply the same limits; a
    sender checks before offering, because a message the peer refuses would otherwise fail the link
    on every reconnect.
    """
    if env.size > max_message_bytes:
        raise MessageTooLargeError(f"message of {env.size} bytes exceeds the peer's limit of {max_message_bytes}")
    header = {"i": env.message_id, "o": 0, "n": env.size, "e": envelope_header(env)}
    try:
        packed = encode_frame(MSG, header, 0)
        decoded = _unpack_header(MSG, memoryview(packed)[K_PREFIX_SIZE:])
        get_str(decoded, "i", MSG)
        envelope_from_header(decoded["i"], decoded["e"])
    except (ValueError, RemoteProtocolError) as exc:
        raise MessageTooLargeError(f"message {env.message_id[:80]!r} cannot cross the link: {exc}") from exc


def envelope_from_header(message_id: str, e: Any) -> Envelope:
    """Validate an ``e`` map from the wire and build an Envelope with an empty payload."""
    if not isinstance(e, dict):
        raise _bad(MSG, "e", "must be a map")
    metadata = e.get("m", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= K_MAX_FIELD for k, v in metadata.items()
    ):
        raise _bad(MSG, "e.m", "must be a map of strings")
    protocol = e.get("p", "osx")
    if protocol not in ("osx", "rollsite"):
        raise _bad(MSG, "e.p", f"= {protocol!r} is not 'osx' or 'rollsite'")
    return Envelope(
        message_id=message_id,
        session_id=get_str(e, "s", MSG),
        topic=get_str(e, "t", MSG, max_len=K_MAX_FIELD),
        src_party=get_str(e, "sp", MSG),
        dst_party=get_str(e, "dp", MSG),
        payload=b"",
        src_role=get_str(e, "sr", MSG, default=""),
        dst_role=get_str(e, "dr", MSG, default=""),
        metadata=metadata,
        protocol=protocol,
        created_at=get_float(e, "c", MSG) if "c" in e else 0.0,
    )
