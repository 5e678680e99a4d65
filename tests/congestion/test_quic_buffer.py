"""The chunked stream send buffer behaves exactly like the bytearray aioquic uses."""

from __future__ import annotations

import pytest
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.quic.stream import QuicStreamSender
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.congestion._quic_buffer import SendBuffer, adopt

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.binary(min_size=0, max_size=300)),
        st.tuples(st.just("del"), st.integers(min_value=0, max_value=400)),
        st.tuples(st.just("get"), st.integers(min_value=0, max_value=600), st.integers(min_value=0, max_value=600)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_matches_bytearray(ops: list[tuple[object, ...]]) -> None:
    ours, ref = SendBuffer(), bytearray()
    for op in ops:
        if op[0] == "add":
            data = op[1]
            assert isinstance(data, bytes)
            ours += data
            ref += data
        elif op[0] == "del":
            n = op[1]
            assert isinstance(n, int)
            del ours[:n]
            del ref[:n]
        else:
            a, b = op[1], op[2]
            assert isinstance(a, int) and isinstance(b, int)
            assert ours[a:b] == bytes(ref[a:b])
        assert len(ours) == len(ref)
        assert bool(ours) == bool(ref)


def test_many_chunks_compact_and_keep_content() -> None:
    ours, ref = SendBuffer(), bytearray()
    for i in range(1000):
        block = bytes([i % 251]) * 97
        ours += block
        ref += block
        if i % 3 == 0:
            del ours[:150]
            del ref[:150]
    assert len(ours) == len(ref)
    for a in range(0, len(ref), 301):
        assert ours[a : a + 1400] == bytes(ref[a : a + 1400])


def test_a_compaction_that_drops_every_chunk_keeps_the_offsets() -> None:
    # The link receiver writes one small ACK frame at a time and the peer acknowledges them all: once
    # K_COMPACT_AFTER chunks were dropped at once, the chunk lists emptied and the next write started
    # again from offset 0, so the sender's slices no longer matched its offsets and a QUIC link stalled
    # until its keepalive timed out (found by `fedgate bench link --quic-workers`).
    ours, ref = SendBuffer(), bytearray()
    for round_ in range(5):
        for i in range(100):
            block = bytes([round_, i]) * 10
            ours += block
            ref += block
        assert ours[0:25] == bytes(ref[0:25])
        del ours[: len(ref)]
        del ref[:]
        assert len(ours) == 0 and not ours
    ours += b"after"
    ref += b"after"
    assert len(ours) == 5 and ours[0:5] == b"after" and ours[1:3] == b"ft"


def test_unsupported_operations_raise() -> None:
    buf = SendBuffer()
    buf += b"abc"
    with pytest.raises(TypeError):
        buf[1]
    with pytest.raises(TypeError):
        del buf[1:2]


def test_aioquic_sender_with_adopted_buffer_sends_retransmits_and_drains() -> None:
    sender = QuicStreamSender(stream_id=0, writable=True)
    adopt(sender)
    adopt(sender)  # idempotent
    payload = bytes(range(256)) * 40
    for i in range(0, len(payload), 1000):
        sender.write(payload[i : i + 1000])
    frames = []
    while (frame := sender.get_frame(1200)) is not None:
        frames.append(frame)
    assert b"".join(f.data for f in frames) == payload
    # the second frame is lost and sent again, the rest is acked
    lost = frames[1]
    sender.on_data_delivery(QuicDeliveryState.LOST, lost.offset, lost.offset + len(lost.data), False)
    again = sender.get_frame(1200)
    assert again is not None and again.offset == lost.offset and again.data == lost.data
    for f in frames:
        sender.on_data_delivery(QuicDeliveryState.ACKED, f.offset, f.offset + len(f.data), False)
    assert len(sender._buffer) == 0
