"""Hypothesis fuzzing of the walker and the payload inspector: never crash, never execute, stay bounded."""

from __future__ import annotations

import pickle
import sys
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgate.audit import PayloadInspector, PickleLimits, PickleWalker
from fedgate.audit.events import (
    EncryptedTensorFound,
    Event,
    GlobalImported,
    KeyFound,
    Malformed,
    ScanLimit,
    TensorFound,
)
from fedgate.proxy.envelope import Envelope
from tests.audit.conftest import fate_inline, forged_pk_pickle, gadget_pickle, osx_envelope
from tests.audit.test_safetensors_scan import blob

K_EVENT_TYPES = (GlobalImported, KeyFound, EncryptedTensorFound, TensorFound, Malformed, ScanLimit)
K_SMALL_LIMITS = PickleLimits(inline_arg_bytes=4096, max_line_bytes=1024, max_memo=2000, max_stack=2000, max_items=256)
K_FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _seeds() -> list[bytes]:
    import numpy as np

    return [
        gadget_pickle("touch /nonexistent/fedgate-fuzz", 4),
        gadget_pickle("touch /nonexistent/fedgate-fuzz", 0),
        forged_pk_pickle(1024),
        pickle.dumps({"bytes": blob(np.arange(12, dtype=np.float32).reshape(4, 3))}, protocol=4),
        pickle.dumps({"a": [1, 2.5, None, "x" * 50], "b": (b"\x00" * 300,)}, protocol=5),
    ]


SEEDS = _seeds()


def _walk(data: bytes, chunks: list[int] | None = None) -> list[Event]:
    before = set(sys.modules)
    walker = PickleWalker(limits=K_SMALL_LIMITS)
    if chunks:
        pos = 0
        for size in chunks:
            walker.feed(data[pos : pos + size])
            pos += size
        walker.feed(data[pos:])
    else:
        walker.feed(data)
    walker.close()
    events = list(walker.events())
    assert set(sys.modules) == before, "walking a pickle imported a module"
    assert all(isinstance(e, K_EVENT_TYPES) for e in events)
    return events


@K_FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _walk(data)


@K_FUZZ
@given(
    st.sampled_from(range(len(SEEDS))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(0, 10_000),
)
def test_mutated_pickles(seed: int, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEEDS[seed])
    for pos, value in flips:
        data[pos % len(data)] = value
    _walk(bytes(data[: max(1, len(data) - cut % len(data))]))


@K_FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.lists(st.integers(1, 200), max_size=30))
def test_any_chunking_gives_the_same_events(seed: int, chunks: list[int]) -> None:
    data = SEEDS[seed]
    assert _walk(data, chunks) == _walk(data)


@settings(max_examples=30, deadline=5000)
@given(st.integers(1, 30))
def test_memory_and_time_stay_bounded(repeat: int) -> None:
    # hostile shapes: many memoized empty lists, deep marks, a huge claimed length
    hostile = [
        b"\x80\x04" + b"]\x94" * (5000 * repeat) + b".",
        b"\x80\x04" + b"(" * (5000 * repeat) + b".",
        b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"\x00" * 1000,
        b"\x80\x04]" + b"(" + b"K\x01" * (2000 * repeat) + b"e" + b".",
    ]
    tracemalloc.start()
    try:
        for data in hostile:
            _walk(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024


@K_FUZZ
@given(st.binary(max_size=2048), st.sampled_from(["osx", "rollsite"]))
def test_payload_inspector_survives_garbage(data: bytes, protocol: str) -> None:
    inspector = PayloadInspector()
    env = Envelope(
        message_id="m",
        session_id="s",
        topic="t",
        src_party="1",
        dst_party="2",
        payload=data,
        protocol=protocol,  # type: ignore[arg-type]
    )
    inspector.inspect(env, now=0.0)
    inspector.inspect(osx_envelope("x", data), now=0.0)
    inspector.inspect(osx_envelope("x", fate_inline(data)), now=0.0)
    inspector.inspect(osx_envelope("x__table_persistent_split__", data, content_type="application/json"), now=0.0)
    assert inspector.pending_bytes >= 0


# -- the fast paths agree with the reference paths ------------------------------------------------------


@K_FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.binary(max_size=64), st.binary(max_size=64))
def test_a_walk_over_a_view_gives_the_same_events(seed: int, before: bytes, after: bytes) -> None:
    """A message body is walked as a view of the payload, in place; the events are those of its bytes."""
    data = SEEDS[seed]
    whole = before + data + after
    view = memoryview(whole)[len(before) : len(before) + len(data)]
    walker = PickleWalker(limits=K_SMALL_LIMITS)
    walker.feed(view)
    walker.close()
    assert walker.events() == _walk(data)


def _reference_osx(payload: bytes) -> tuple[bytes, bytes] | None:
    from google.protobuf.message import DecodeError

    from fedgate.proxy.protos import osx_pb2

    try:
        msg = osx_pb2.Message.FromString(payload)
    except DecodeError:
        return None
    return msg.head, msg.body


def _field(tag: int, value: bytes) -> bytes:
    length, out = len(value), bytearray()
    while True:
        out.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            return bytes([tag]) + bytes(out) + value


@K_FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from([0x0A, 0x12, 0x1A, 0x08, 0x22, 0x0B, 0x1D]), st.binary(max_size=300)), max_size=6
    ),
    st.integers(0, 400),
    st.binary(max_size=8),
)
def test_the_plain_osx_reader_agrees_with_protobuf(fields: list[tuple[int, bytes]], cut: int, tail: bytes) -> None:
    from fedgate.audit.payload import _osx_message

    payload = b"".join(_field(tag, value) for tag, value in fields)
    for data in (payload, payload[: max(0, len(payload) - cut)], payload + tail, tail + payload, tail):
        fast = _osx_message(data)
        if fast is not None:  # None: the caller asks protobuf instead
            assert (fast[0], bytes(fast[1])) == _reference_osx(data)


@K_FUZZ
@given(st.binary(max_size=300))
def test_the_json_head_reader_agrees_with_json_loads(head: bytes) -> None:
    import json

    from fedgate.audit.payload import _json_head

    for raw in (head, b"{" + head, b'{"message_id": "x"}', b"{\x00\x00\x00"):
        try:
            expected: object = json.loads(raw)
        except ValueError as exc:
            expected = type(exc)
        try:
            got: object = _json_head(raw)
        except ValueError as exc:
            got = type(exc)
        assert got == expected
