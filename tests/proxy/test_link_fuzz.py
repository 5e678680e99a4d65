"""Fuzz: arbitrary bytes into either core never crash, hang or grow buffers without bound."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgate.proxy.link_core import LinkParams, LinkState
from fedgate.proxy.link_events import ConnectionTerminated, LinkEvent
from fedgate.proxy.link_frames import HELLO, K_MAX_HEADER, K_PREFIX_SIZE, MSG, encode_frame
from fedgate.proxy.link_recv import LinkReceiverCore
from fedgate.proxy.link_send import LinkSenderCore

K_CHUNK = 4096
SENDER_HELLO = encode_frame(HELLO, {"magic": "fedgate-link", "v": [1], "party": "9", "role": "sender",
                                    "k": K_CHUNK, "w": 1 << 20, "ka": 10.0})
RECEIVER_HELLO = encode_frame(HELLO, {"magic": "fedgate-link", "v": [1], "party": "1", "role": "receiver",
                                      "k": K_CHUNK, "w": 1 << 20, "ka": 10.0})
VALID_MSG = encode_frame(MSG, {"i": "m", "o": 0, "n": 3, "e": {"s": "s", "t": "t", "sp": "9", "dp": "1"}}, 3) + b"abc"


def feed(core: LinkReceiverCore | LinkSenderCore, pieces: list[bytes]) -> list[LinkEvent]:
    out: list[LinkEvent] = []
    for piece in pieces:
        events = core.receive_data(piece, now=0.0)
        steps = 0
        while events:
            out += events
            steps += 1
            assert steps < 100_000  # no hang: every step consumes a frame
            events = core.next_events(now=0.0)
        bound = K_PREFIX_SIZE + K_MAX_HEADER + K_CHUNK + len(piece)
        assert core._decoder.buffered <= bound  # the property under test
    return out


def check(core: LinkReceiverCore | LinkSenderCore, events: list[LinkEvent]) -> None:
    terminated = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(terminated) <= 1
    if core.state is LinkState.ERROR:
        assert terminated and terminated[0].reason  # a clear error, said once
        assert core.receive_data(b"\x02" * 10, now=1.0) == []  # and it stays in ERROR
    core.data_to_send()  # output never raises


pieces = st.lists(st.binary(min_size=1, max_size=600), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from([b"", SENDER_HELLO, SENDER_HELLO + VALID_MSG]), data=pieces)
def test_receiver_survives_arbitrary_bytes(prefix: bytes, data: list[bytes]) -> None:
    core = LinkReceiverCore(LinkParams("1", chunk_bytes=K_CHUNK, window_bytes=1 << 20), now=0.0)
    events = feed(core, [prefix, *data] if prefix else data)
    check(core, events)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from([b"", RECEIVER_HELLO]), data=pieces)
def test_sender_survives_arbitrary_bytes(prefix: bytes, data: list[bytes]) -> None:
    core = LinkSenderCore(LinkParams("9", chunk_bytes=K_CHUNK, window_bytes=1 << 20), now=0.0, expected_peer="1")
    events = feed(core, [prefix, *data] if prefix else data)
    check(core, events)


@settings(max_examples=200, deadline=None)
@given(flip=st.integers(min_value=0, max_value=len(SENDER_HELLO + VALID_MSG) - 1), value=st.integers(0, 255))
def test_receiver_survives_single_byte_corruption(flip: int, value: int) -> None:
    data = bytearray(SENDER_HELLO + VALID_MSG)
    data[flip] = value
    core = LinkReceiverCore(LinkParams("1", chunk_bytes=K_CHUNK, window_bytes=1 << 20), now=0.0)
    check(core, feed(core, [bytes(data)]))


def test_huge_declared_frame_fails_at_once() -> None:
    core = LinkReceiverCore(LinkParams("1", chunk_bytes=K_CHUNK, window_bytes=1 << 20), now=0.0)
    events = feed(core, [SENDER_HELLO, encode_frame(MSG, {"i": "m"}, 2**31)])
    assert core.state is LinkState.ERROR
    assert any(isinstance(e, ConnectionTerminated) and "exceeds" in e.reason for e in events)
