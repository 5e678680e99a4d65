"""Pure parts of the RDMA carrier: wire codec, credits, rendezvous chunking, registration pool."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedgate.errors import RemoteProtocolError
from fedgate.rdma._credits import CreditWindow
from fedgate.rdma._pool import RegistrationPool, size_class
from fedgate.rdma._rendezvous import ReadScheduler, RendezvousSenders, TransferState, plan_chunks
from fedgate.rdma._wire import (
    Hello,
    MsgKind,
    decode_header,
    decode_hello,
    decode_rts,
    encode_header,
    encode_hello,
    encode_rts,
)

HELLO = Hello(qpn=17, psn=0xABCDE, gid="0000:0000:0000:0000:0000:ffff:0a00:020f", lid=0, mtu=3,
              recv_slots=64, slot_bytes=65536, rd_atomic=8)  # fmt: skip


def test_header_round_trip_and_rts_tail() -> None:
    data = encode_header(MsgKind.DATA, credits=5, length=3) + b"abc"
    header = decode_header(data, len(data))
    assert (header.kind, header.credits, header.length) == (MsgKind.DATA, 5, 3)
    rts = encode_rts(credits=1, ident=9, total=1 << 26, addr=0x7F0012340000, rkey=77)
    assert decode_header(rts, len(rts)).ident == 9
    assert decode_rts(rts) == (1 << 26, 0x7F0012340000, 77)


@pytest.mark.parametrize(
    ("data", "byte_len", "match"),
    [
        (b"\x01" * 4, 4, "shorter than its header"),
        (bytes([99]) + bytes(15), 16, "unknown rdma message kind"),
        (encode_header(MsgKind.DATA, credits=0, length=10) + b"x", 17, "header says 26"),
        (encode_header(MsgKind.DATA, credits=0, length=0), 16, "empty payload"),
        (encode_header(MsgKind.RTS, credits=0), 16, "header says"),
    ],
)
def test_malformed_headers_are_the_peers_fault(data: bytes, byte_len: int, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_header(data, byte_len)


def test_hello_round_trip_and_validation() -> None:
    assert decode_hello(encode_hello(HELLO)) == HELLO
    for bad in (b"not json\n", b'{"v": 2}\n', b"[]\n", b"x" * 5000):
        with pytest.raises(RemoteProtocolError):
            decode_hello(bad)
    text = encode_hello(HELLO).decode()
    with pytest.raises(RemoteProtocolError, match="recv_slots"):
        decode_hello(text.replace('"recv_slots":64', '"recv_slots":2').encode())
    with pytest.raises(RemoteProtocolError, match="gid"):
        decode_hello(text.replace("020f", "02zz").encode())
    with pytest.raises(RemoteProtocolError, match="qpn"):
        decode_hello(text.replace('"qpn":17', '"qpn":true').encode())


def test_credit_reserve_and_threshold() -> None:
    w = CreditWindow(send_window=4, recv_window=8)
    assert w.threshold == 4
    for _ in range(3):
        assert w.can_send()
        w.consume()
    assert not w.can_send() and w.can_send(credit_only=True)
    assert not w.credit_message_due()  # nothing owed: the last credit stays put
    for _ in range(4):
        w.on_reposted()
    assert w.credit_message_due()
    assert w.consume(credit_only=True) == 4
    assert w.credits == 0 and w.owed == 0
    w.on_returned(4)
    assert w.credits == 4
    with pytest.raises(RemoteProtocolError):
        w.on_returned(1)
    with pytest.raises(ValueError):
        CreditWindow(send_window=3, recv_window=8)


@given(total=st.integers(1, 10**7), chunk=st.integers(1000, 10**6))
def test_chunks_cover_the_message_exactly(total: int, chunk: int) -> None:
    pieces = list(plan_chunks(total, chunk))
    assert sum(n for _, n in pieces) == total
    assert all(0 < n <= chunk for _, n in pieces)
    expected_offset = 0
    for offset, n in pieces:
        assert offset == expected_offset
        expected_offset += n


def test_read_scheduler_bounds_reads_in_flight_and_keeps_transfer_order() -> None:
    s = ReadScheduler(chunk_bytes=100, max_reads=3)
    s.announce(ident=1, total=250, addr=1000, rkey=5)
    s.announce(ident=2, total=50, addr=5000, rkey=6)
    first = s.next_reads()
    assert [(c.ident, c.offset, c.length, c.remote_addr) for c in first] == [
        (1, 0, 100, 1000), (1, 100, 100, 1100), (1, 200, 50, 1200),
    ]  # fmt: skip
    assert s.next_reads() == []
    s.on_read_complete(1, 100)
    assert [(c.ident, c.length) for c in s.next_reads()] == [(2, 50)]
    s.on_read_complete(1, 0)
    assert s.get(1).state is TransferState.READING
    s.on_read_complete(1, 200)
    assert s.get(1).state is TransferState.COMPLETE
    s.forget(1)
    with pytest.raises(RuntimeError):
        s.forget(2)  # not complete yet
    with pytest.raises(RemoteProtocolError):
        s.announce(ident=2, total=1, addr=0, rkey=0)


def test_rendezvous_senders_bound_and_fin() -> None:
    s = RendezvousSenders(max_outstanding=2)
    a, b = s.start(10), s.start(11)
    assert not s.has_room()
    assert s.finish(b) == 11 and s.has_room()
    with pytest.raises(RemoteProtocolError):
        s.finish(b)
    assert s.tokens() == [10] and a == 1


def test_pool_reuses_by_size_class_and_trims_its_cache() -> None:
    allocated: list[int] = []
    released: list[object] = []

    class Buf:
        def __init__(self, size: int) -> None:
            self.size = size
            allocated.append(size)

    pool: RegistrationPool[Buf] = RegistrationPool(Buf, released.append, min_bytes=1024, max_cached_bytes=4096)
    assert size_class(1, min_bytes=1024) == 1024 and size_class(1025, min_bytes=1024) == 2048
    a, cap = pool.get(1500)
    assert cap == 2048 and allocated == [2048]
    pool.put(a)
    b, _ = pool.get(2000)
    assert b is a and allocated == [2048]  # reused, not registered again
    c, _ = pool.get(3000)
    d, _ = pool.get(100)
    pool.put(b)
    pool.put(c)  # 2048 + 4096 cached > 4096: the largest class goes
    assert released == [c]
    pool.put(d)
    stats = pool.statistics()
    assert stats.registrations == 3 and stats.reuses == 1 and stats.lent_bytes == 0
    pool.close()
    assert set(map(id, released)) == {id(a), id(c), id(d)}
    with pytest.raises(RuntimeError):
        pool.get(10)


def test_pool_never_caches_buffers_larger_than_the_cache() -> None:
    released: list[bytearray] = []
    pool: RegistrationPool[bytearray] = RegistrationPool(bytearray, released.append, min_bytes=16, max_cached_bytes=64)
    buf, _ = pool.get(100)
    pool.put(buf)
    assert released == [buf]
