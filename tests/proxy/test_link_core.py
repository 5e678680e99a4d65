"""Pure-core tests: a sender core and a receiver core joined by a fake in-memory link, explicit times."""

from __future__ import annotations

import dataclasses

import pytest

from fedgate.errors import LocalError
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import K_FRAME_CHARGE, LinkParams, LinkState
from fedgate.proxy.link_events import (
    ChunkReceived,
    ChunkStored,
    ConnectionTerminated,
    HandshakeCompleted,
    LinkEvent,
    MessagesAcked,
    RttMeasured,
)
from fedgate.proxy.link_frames import MSG, FrameDecoder, encode_frame
from fedgate.proxy.link_recv import LinkReceiverCore, plan_chunk
from fedgate.proxy.link_send import LinkSenderCore

CHUNK = 4096


def env(mid: str, size: int = 100, topic: str = "t") -> Envelope:
    return Envelope(message_id=mid, session_id="s", topic=topic, src_party="9999", dst_party="10000",
                    payload=bytes((i * 7 + len(mid)) % 251 for i in range(size)), metadata={"x-ptp-tag": mid})


def drain(core: LinkReceiverCore, data: bytes, now: float = 0.0) -> list[LinkEvent]:
    """Every event ``data`` produces (following the pauses after each chunk)."""
    events = core.receive_data(data, now=now)
    out = list(events)
    while events:
        events = core.next_events(now=now)
        out += events
    return out


class Pair:
    """A sender and a receiver core; ``store`` plays the receiver's inbox (staging + queue)."""

    def __init__(self, *, window: int = 64 * CHUNK, staged: dict[str, bytearray] | None = None,
                 sender_party: str = "9999", expected: str = "10000", keepalive: float = 10.0) -> None:
        self.now = 0.0
        self.sender = LinkSenderCore(
            LinkParams(sender_party, chunk_bytes=CHUNK, window_bytes=window, keepalive_s=keepalive),
            now=self.now, expected_peer=expected)
        self.receiver = LinkReceiverCore(
            LinkParams("10000", chunk_bytes=CHUNK, window_bytes=window, keepalive_s=keepalive), now=self.now)
        self.staged: dict[str, bytearray] = staged if staged is not None else {}
        self.delivered: list[Envelope] = []
        self.sender_events: list[LinkEvent] = []
        self.receiver_events: list[LinkEvent] = []
        self.auto = True
        """Receiver handles chunks (stage, deliver, ack, release) as they come."""
        self.held: list[ChunkReceived] = []
        self.wire_to_receiver = 0

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for data in self.sender.data_to_send():
                moved = True
                self.wire_to_receiver += len(data)
                events = self.receiver.receive_data(bytes(data), now=self.now)
                while events:
                    for ev in events:
                        self.receiver_events.append(ev)
                        if isinstance(ev, ChunkReceived):
                            if self.auto:
                                self.handle(ev)
                            else:
                                self.held.append(ev)
                    events = self.receiver.next_events(now=self.now)
            for data in self.receiver.data_to_send():
                moved = True
                self.sender_events.extend(self.sender.receive_data(bytes(data), now=self.now))
            if not moved:
                return

    def handle(self, ev: ChunkReceived) -> None:
        mid = ev.envelope.message_id
        if ev.whole:
            payload = ev.data
        else:
            have = len(self.staged.get(mid, b""))
            plan = plan_chunk(have=have, offset=ev.offset, data=ev.data)
            if plan.resume:
                self.receiver.resume(mid, have)
                self.receiver.release(ev.charge)
                return
            if plan.hint:
                self.receiver.progress(mid, have)
            if plan.append is not None:
                self.staged.setdefault(mid, bytearray()).extend(plan.append)
                self.receiver.progress(mid, len(self.staged[mid]))
            if not ev.last:
                self.receiver.release(ev.charge)
                return
            payload = bytes(self.staged.pop(mid))
        if mid not in {e.message_id for e in self.delivered}:
            self.delivered.append(dataclasses.replace(ev.envelope, payload=payload))
        self.receiver.ack(mid)
        self.receiver.release(ev.charge)

    def acked(self) -> list[str]:
        return [m for ev in self.sender_events if isinstance(ev, MessagesAcked) for m in ev.message_ids]


def test_handshake_then_messages_arrive_in_order_and_are_acked() -> None:
    p = Pair()
    p.pump()
    assert p.sender.state is LinkState.OPEN and p.receiver.state is LinkState.OPEN
    hs = [e for e in p.receiver_events if isinstance(e, HandshakeCompleted)]
    assert hs and hs[0].peer_party == "9999" and hs[0].version == 1 and "resume" in hs[0].capabilities
    msgs = [env(f"m{i}", size) for i, size in enumerate([0, 1, 100, CHUNK, CHUNK + 1, 5 * CHUNK + 17])]
    for m in msgs:
        p.sender.offer(m)
    p.pump()
    assert [e.message_id for e in p.delivered] == [m.message_id for m in msgs]
    assert [e.payload for e in p.delivered] == [m.payload for m in msgs]
    assert p.delivered[2].metadata == {"x-ptp-tag": "m2"} and p.delivered[2].topic == "t"
    assert p.acked() == [m.message_id for m in msgs]
    assert p.sender.unacked == 0 and p.receiver.outstanding == 0


def test_sender_never_exceeds_credit_and_resumes_when_released() -> None:
    window = 2 * (CHUNK + K_FRAME_CHARGE)
    p = Pair(window=window)
    p.pump()
    p.auto = False
    for i in range(5):
        p.sender.offer(env(f"m{i}", CHUNK))
    p.pump()
    assert len(p.held) == 2 and p.sender.blocked_on_credit
    assert p.receiver.outstanding <= window
    for ev in p.held:  # deliver and release: credit flows back, the rest follows
        p.handle(ev)
    p.held.clear()
    p.auto = True
    p.pump()
    assert len(p.delivered) == 5 and p.sender.unacked == 0


def test_receiver_rejects_a_sender_that_ignores_credit() -> None:
    p = Pair(window=CHUNK + K_FRAME_CHARGE)
    p.pump()
    frames = b"".join(
        encode_frame(MSG, {"i": f"x{i}", "o": 0, "n": CHUNK, "e": {"s": "s", "t": "t", "sp": "9", "dp": "1"}}, CHUNK)
        + bytes(CHUNK) for i in range(2))
    events = drain(p.receiver, frames)
    term = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert term and term[0].code == "protocol_error" and "credit" in term[0].reason
    assert p.receiver.state is LinkState.ERROR
    assert p.receiver.receive_data(b"more", now=1) == []  # stays in ERROR, ignores input
    with pytest.raises(LocalError):
        p.receiver.ack("x0")


def test_resume_after_reconnect_sends_only_the_rest() -> None:
    big = env("big", 10 * CHUNK)
    staged: dict[str, bytearray] = {}
    p = Pair(staged=staged)
    p.pump()
    p.sender.offer(big)
    # Only four chunks get through before the "connection" dies.
    for ev in drain(p.receiver, b"".join(bytes(d) for d in p.sender.data_to_send())):
        if isinstance(ev, ChunkReceived) and ev.offset < 4 * CHUNK:
            p.handle(ev)
    progress = [e for e in p.sender.receive_data(b"".join(bytes(d) for d in p.receiver.data_to_send()), now=0)
                if isinstance(e, ChunkStored)]
    assert progress[-1].offset == 4 * CHUNK == len(staged["big"])
    # A new connection: the adapter offers the message with the resume point it learned.
    q = Pair(staged=staged)
    q.pump()
    q.sender.offer(big, resume_offset=progress[-1].offset)
    q.pump()
    assert [e.payload for e in q.delivered] == [big.payload]
    assert q.wire_to_receiver < 7 * (CHUNK + 200)  # six chunks plus headers, not ten


def test_sender_without_memory_skips_ahead_on_progress_hint() -> None:
    big = env("big", 10 * CHUNK)
    staged = {"big": bytearray(big.payload[: 8 * CHUNK])}
    p = Pair(staged=staged, window=3 * (CHUNK + K_FRAME_CHARGE))
    p.pump()
    p.sender.offer(big)  # restarted sender: starts at 0, the receiver tells it to skip to 8 chunks
    p.pump()
    assert [e.payload for e in p.delivered] == [big.payload]
    assert p.wire_to_receiver < 6 * (CHUNK + 200)


def test_gap_makes_the_receiver_ask_for_a_rewind_and_order_holds() -> None:
    first, second = env("first", 6 * CHUNK), env("second", 10)
    p = Pair(staged={})
    p.pump()
    p.sender.offer(first, resume_offset=3 * CHUNK)  # claims 3 chunks staged, but the store has none
    p.sender.offer(second)
    p.pump()
    assert [e.message_id for e in p.delivered] == ["first", "second"]
    assert p.delivered[0].payload == first.payload
    assert p.acked() == ["first", "second"]


def test_duplicate_delivery_is_acked_but_stored_once() -> None:
    p = Pair()
    p.pump()
    p.sender.offer(env("a"))
    p.pump()
    q = Pair()
    q.delivered = p.delivered  # the same store on the next connection
    q.pump()
    q.sender.offer(env("a"))
    q.pump()
    assert [e.message_id for e in q.delivered] == ["a"] and q.acked() == ["a"]


def test_rejection_is_final_and_reported() -> None:
    p = Pair()
    p.pump()
    p.auto = False
    p.sender.offer(env("bad"))
    p.pump()
    ev = p.held.pop()
    p.receiver.reject("bad", rule="pickle", detail="os.system")
    p.receiver.release(ev.charge)
    p.pump()
    acked = [e for e in p.sender_events if isinstance(e, MessagesAcked)]
    assert acked[0].rejected[0].rule == "pickle" and acked[0].message_ids == ()
    assert p.sender.unacked == 0


def test_wrong_party_is_unauthorized() -> None:
    p = Pair(sender_party="6666")
    p.sender = LinkSenderCore(LinkParams("9999", chunk_bytes=CHUNK), now=0, expected_peer="10000",
                              authenticated_peer="7777")
    p.pump()
    term = [e for e in p.sender_events if isinstance(e, ConnectionTerminated)]
    assert term[0].code == "unauthorized" and "certificate says '7777'" in term[0].reason


def test_expected_peer_mismatch_is_unauthorized() -> None:
    p = Pair(expected="4242")
    p.pump()
    term = [e for e in p.sender_events if isinstance(e, ConnectionTerminated)]
    assert term and term[0].code == "unauthorized" and "expected '4242'" in term[0].reason
    rterm = [e for e in p.receiver_events if isinstance(e, ConnectionTerminated)]
    assert rterm and rterm[0].by_peer and rterm[0].code == "unauthorized"


def test_keepalive_ping_measures_rtt_and_silence_times_out() -> None:
    p = Pair(keepalive=1.0)
    p.pump()
    p.now = 1.0
    p.sender.handle_timer(now=1.0)
    for data in p.sender.data_to_send():
        p.receiver.receive_data(bytes(data), now=1.0)
    p.now = 1.25
    events = p.sender.receive_data(b"".join(bytes(d) for d in p.receiver.data_to_send()), now=1.25)
    assert [e.rtt for e in events if isinstance(e, RttMeasured)] == [0.25]
    timer = p.receiver.get_timer()
    assert timer is not None and timer <= 1.0 + 3.0
    events = p.receiver.handle_timer(now=5.0)
    assert isinstance(events[0], ConnectionTerminated) and events[0].code == "timeout"
    assert p.receiver.state is LinkState.ERROR


def test_handshake_timeout() -> None:
    core = LinkReceiverCore(LinkParams("1", handshake_timeout_s=2.0), now=0.0)
    assert core.get_timer() == 2.0
    events = core.handle_timer(now=2.5)
    assert isinstance(events[0], ConnectionTerminated) and events[0].code == "timeout"


def test_graceful_close_both_ways() -> None:
    p = Pair()
    p.pump()
    p.sender.close(now=0.0, code="shutdown", reason="bye")
    p.pump()
    s = [e for e in p.sender_events if isinstance(e, ConnectionTerminated)]
    r = [e for e in p.receiver_events if isinstance(e, ConnectionTerminated)]
    assert s[0].code == "shutdown" and not s[0].by_peer and r[0].by_peer and r[0].reason == "bye"
    assert p.sender.state is LinkState.CLOSED and p.receiver.state is LinkState.CLOSED


def test_version_mismatch_is_reported() -> None:
    core = LinkReceiverCore(LinkParams("1"), now=0.0)
    hello = encode_frame(1, {"magic": "fedgate-link", "v": [7], "party": "2", "role": "sender", "k": 4096,
                             "w": 1 << 20, "ka": 10.0})
    events = core.receive_data(hello, now=0.0)
    assert isinstance(events[0], ConnectionTerminated) and events[0].code == "version"
    decoder = FrameDecoder(max_payload=0)
    decoder.feed(b"".join(bytes(d) for d in core.data_to_send()))
    frames = [decoder.next_frame() for _ in range(2)]
    assert frames[1] is not None and frames[1].header["code"] == "version"  # HELLO, then CLOSE with why


def test_params_from_config() -> None:
    from fedgate.config import LinkConfig

    params = LinkParams.from_config(LinkConfig(chunk_bytes=65536, keepalive_s=3.0), local_party="9999")
    assert (params.local_party, params.chunk_bytes, params.keepalive_s) == ("9999", 65536, 3.0)
    assert params.window_bytes == LinkConfig().window_bytes


def test_pure_core_modules_import_no_io() -> None:
    """STYLE §1: the sans-IO modules never import asyncio, socket, ssl, time or grpc."""
    import ast
    import pathlib

    import fedgate.proxy

    root = pathlib.Path(fedgate.proxy.__file__).parent
    forbidden = {"asyncio", "socket", "ssl", "time", "grpc", "select", "threading"}
    for name in ("link_frames", "link_events", "link_core", "link_send", "link_recv"):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & forbidden, f"{name} imports {imported & forbidden}"


def test_local_misuse_moves_the_sender_to_error_and_it_stays() -> None:
    p = Pair()
    p.pump()
    p.sender.offer(env("a"))
    with pytest.raises(LocalError):
        p.sender.offer(env("a"))  # the same message twice: a bug of the caller
    assert p.sender.state is LinkState.ERROR
    with pytest.raises(LocalError, match="error"):
        p.sender.offer(env("b"))
    assert p.sender.receive_data(b"\x00" * 20, now=1.0) == []


def test_exported_names_exist() -> None:
    import importlib

    for name in ("link_frames", "link_events", "link_core", "link_send", "link_recv", "link_session",
                 "link_sender", "link_listener", "link_metrics", "link_doctor", "link_bench", "tcp_carrier",
                 "certs", "carriers", "testing"):
        module = importlib.import_module(f"fedgate.proxy.{name}")
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names missing attributes: {missing}"
        assert len(set(module.__all__)) == len(module.__all__)
