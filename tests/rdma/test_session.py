"""The sans-IO channel core, alone and as a pair over a simulated RC QP pair."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.errors import RemoteProtocolError
from fedgate.rdma._session import EagerMessage, PostRecv, PostSend, RdmaSession, SessionState
from fedgate.rdma._wire import MsgKind, decode_header, encode_header
from tests.rdma.sim import make_pair, run


def _messages(rng: random.Random, count: int, *, max_size: int) -> list[bytes]:
    return [rng.randbytes(rng.choice([1, 2, rng.randint(1, max_size)])) for _ in range(count)]


def _session(**kw: int) -> RdmaSession:
    args = dict(recv_slots=4, send_slots=4, peer_recv_slots=4, max_eager=100, chunk_bytes=64, max_reads=2,
                max_rendezvous=2)  # fmt: skip
    args.update(kw)
    return RdmaSession(**args)


def test_initial_actions_post_every_receive_slot() -> None:
    s = _session(recv_slots=6)
    assert s.actions(now=0.0) == [PostRecv(i) for i in range(6)]
    assert s.actions(now=0.0) == []


def test_eager_send_keeps_one_credit_in_reserve() -> None:
    s = _session()
    s.actions(now=0.0)
    for token in range(5):
        s.queue_eager(token, 10)
    sends = [a for a in s.actions(now=1.0) if isinstance(a, PostSend)]
    assert [a.token for a in sends] == [0, 1, 2]  # window 4, one credit kept back
    assert s.queued == 2
    assert s.oldest_posted() == 1.0


def test_returned_credits_unblock_and_reposted_slot_precedes_the_credit_report() -> None:
    s = _session()
    s.actions(now=0.0)
    for token in range(4):
        s.queue_eager(token, 10)
    s.actions(now=0.0)
    # the peer returns 2 credits on a DATA message; we deliver it and free its slot
    data = encode_header(MsgKind.DATA, credits=2, length=3) + b"abc"
    s.on_recv(0, data, len(data))
    delivery = s.next_delivery()
    assert delivery == EagerMessage(0, 3)
    s.consumed(delivery)
    actions = s.actions(now=2.0)
    assert actions[0] == PostRecv(0)
    send = actions[1]
    assert isinstance(send, PostSend) and send.token == 3
    assert decode_header(send.header, 16 + 10).credits == 1


def test_credit_message_when_owed_reaches_threshold() -> None:
    s = _session()
    s.actions(now=0.0)
    for i in range(2):
        data = encode_header(MsgKind.DATA, credits=0, length=1) + b"x"
        s.on_recv(i, data, len(data))
        d = s.next_delivery()
        assert d is not None
        s.consumed(d)
    actions = s.actions(now=0.0)
    sends = [a for a in actions if isinstance(a, PostSend)]
    assert len(sends) == 1
    header = decode_header(sends[0].header, 16)
    assert header.kind is MsgKind.CREDIT and header.credits == 2


def test_peer_returning_too_many_credits_is_a_protocol_error() -> None:
    s = _session()
    s.actions(now=0.0)
    data = encode_header(MsgKind.CREDIT, credits=1)
    with pytest.raises(RemoteProtocolError):
        s.on_recv(0, data, len(data))
    assert s.state is SessionState.ERROR
    assert s.actions(now=0.0) == []


def test_data_after_close_is_a_protocol_error() -> None:
    s = _session()
    s.actions(now=0.0)
    close = encode_header(MsgKind.CLOSE, credits=0)
    s.on_recv(0, close, len(close))
    data = encode_header(MsgKind.DATA, credits=0, length=1) + b"x"
    with pytest.raises(RemoteProtocolError, match="after CLOSE"):
        s.on_recv(1, data, len(data))


def test_fin_for_unknown_transfer_is_a_protocol_error() -> None:
    s = _session()
    s.actions(now=0.0)
    fin = encode_header(MsgKind.FIN, credits=0, ident=99)
    with pytest.raises(RemoteProtocolError, match="unknown transfer"):
        s.on_recv(0, fin, len(fin))


@pytest.mark.parametrize("seed", range(30))
def test_pair_both_sides_sending_delivers_everything_in_order(seed: int) -> None:
    rng = random.Random(seed)
    msgs_a = _messages(rng, 60, max_size=1000)
    msgs_b = _messages(rng, 60, max_size=1000)
    a, b = make_pair(msgs_a, msgs_b)
    run(a, b, rng)
    assert b.received == msgs_a
    assert a.received == msgs_b
    assert not a.sources and not b.sources  # every rendezvous buffer came back by FIN


@pytest.mark.parametrize("slots", [4, 5, 8])
def test_pair_one_sided_traffic_gets_credits_back_without_data_the_other_way(slots: int) -> None:
    rng = random.Random(slots)
    msgs = _messages(rng, 200, max_size=200)
    a, b = make_pair(msgs, [], slots=slots)
    run(a, b, rng)
    assert b.received == msgs
    assert a.session.credits.statistics().credit_messages == 0
    assert b.session.credits.statistics().credit_messages > 0


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    slots=st.integers(4, 9),
    sizes_a=st.lists(st.integers(1, 700), max_size=40),
    sizes_b=st.lists(st.integers(1, 700), max_size=40),
    max_reads=st.integers(1, 3),
    max_rendezvous=st.integers(1, 3),
)
def test_pair_never_deadlocks(
    seed: int, slots: int, sizes_a: list[int], sizes_b: list[int], max_reads: int, max_rendezvous: int
) -> None:
    rng = random.Random(seed)
    msgs_a = [rng.randbytes(n) for n in sizes_a]
    msgs_b = [rng.randbytes(n) for n in sizes_b]
    a, b = make_pair(msgs_a, msgs_b, slots=slots, max_reads=max_reads, max_rendezvous=max_rendezvous, chunk_bytes=128)
    run(a, b, rng)
    assert b.received == msgs_a and a.received == msgs_b
