"""Frame codec tests: round trips, incremental decoding, size caps, header validation."""

from __future__ import annotations

import msgpack
import pytest

from fedgate.errors import RemoteProtocolError
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_frames import (
    ACK,
    K_PREFIX_SIZE,
    MSG,
    PING,
    FrameDecoder,
    encode_frame,
    envelope_from_header,
    envelope_header,
)


def test_round_trip_byte_by_byte() -> None:
    data = encode_frame(MSG, {"i": "m", "o": 0, "n": 5}, 5) + b"hello" + encode_frame(ACK, {"a": ["m"]})
    decoder = FrameDecoder(max_payload=1024)
    frames = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert [(f.type, f.payload) for f in frames] == [(MSG, b"hello"), (ACK, b"")]
    assert frames[0].header == {"i": "m", "o": 0, "n": 5} and decoder.buffered == 0


def test_declared_oversize_payload_fails_before_buffering() -> None:
    decoder = FrameDecoder(max_payload=1000)
    decoder.feed(encode_frame(MSG, {"i": "m"}, 10**9))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (bytes([99, 0, 0, 0, 0, 0, 0]), "unknown frame type"),
        (encode_frame(PING, None, 3) + b"abc", "must not carry a payload"),
        (bytes([PING, 0, 2, 0, 0, 0, 0]) + b"\xc1\xc1", "not valid msgpack"),
        (bytes([PING, 0, 1, 0, 0, 0, 0]) + msgpack.packb(1), "not a map"),
    ],
)
def test_malformed_frames_are_protocol_errors(data: bytes, match: str) -> None:
    decoder = FrameDecoder(max_payload=100)
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError, match=match):
        decoder.next_frame()


def test_prefix_size_is_seven_bytes() -> None:
    assert K_PREFIX_SIZE == 7 and len(encode_frame(PING)) == 7


def test_envelope_header_round_trip_and_validation() -> None:
    env = Envelope(message_id="m1", session_id="s", topic="t", src_party="1", dst_party="2", payload=b"x",
                   src_role="guest", dst_role="host", metadata={"k": "v"}, protocol="rollsite", created_at=12.5)
    back = envelope_from_header("m1", msgpack.unpackb(msgpack.packb(envelope_header(env))))
    assert back == Envelope(**{**{f: getattr(env, f) for f in env.__slots__}, "payload": b""})
    with pytest.raises(RemoteProtocolError, match=r"e\.p"):
        envelope_from_header("m1", {**envelope_header(env), "p": "http"})
    with pytest.raises(RemoteProtocolError, match=r"e\.m"):
        envelope_from_header("m1", {**envelope_header(env), "m": {"k": 1}})
    with pytest.raises(RemoteProtocolError, match="'s'"):
        envelope_from_header("m1", {"t": "t", "sp": "1", "dp": "2"})
