"""The part of the link protocol both ends share: states, handshake, keepalive, close, output.

Rules of this module:

1. Pure sans-IO: bytes in (``receive_data``), frames out (``data_to_send``), time passed in as the
   keyword-only ``now`` (seconds, any monotonic clock), one timer (``get_timer``/``handle_timer``).
2. A link connection carries data one way: a ``sender`` (:mod:`fedgate.proxy.link_send`) pushes
   messages to a ``receiver`` (:mod:`fedgate.proxy.link_recv`), which acknowledges them.
3. Both ends send HELLO at once; each validates the other's (magic, a common version, opposite role,
   the party id against the certificate and the expected peer). No other frame is legal before it.
4. After any exception the core moves to ``ERROR`` and stays there: ``receive_data`` turns the error
   into a :class:`ConnectionTerminated` event and queues a CLOSE frame saying why; later input is
   ignored and local calls raise. A malformed peer thus closes only its own link.
5. HELLO may carry the adapter's wall clock (``t``, seconds since the epoch, passed in as
   ``wall_time``); the peer's shows up in :class:`HandshakeCompleted` for clock-skew checks.
6. Keepalive: each end sends PING every ``keepalive_s``; no bytes from the peer for three of the
   peer's keepalive intervals is a ``timeout``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedgate.errors import FedgateError, LocalError, RemoteProtocolError
from fedgate.proxy.link_events import ConnectionTerminated, HandshakeCompleted, LinkEvent, RttMeasured
from fedgate.proxy.link_frames import (
    CLOSE,
    HELLO,
    K_MAGIC,
    PING,
    PONG,
    Frame,
    FrameDecoder,
    encode_frame,
    get_float,
    get_int,
    get_list,
    get_str,
)

if TYPE_CHECKING:
    from fedgate.config import LinkConfig

__all__ = [
    "K_COALESCE", "K_FRAME_CHARGE", "K_VERSIONS", "LinkCore", "LinkParams", "LinkProtocolViolation", "LinkState",
]

K_VERSIONS = (1,)  # link protocol versions this code speaks
K_FRAME_CHARGE = 256  # bytes of credit each MSG frame costs on top of its payload (header overhead)
K_COALESCE = 64 * 1024  # bytes; payloads smaller than this are copied into one write with their neighbours
K_MAX_REASON = 1000  # characters of a CLOSE reason


class LinkState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
    ERROR = "error"


class LinkProtocolViolation(RemoteProtocolError):
    """A peer error with the CLOSE code to send (``protocol_error``, ``unauthorized``, ``version``...)."""

    def __init__(self, message: str, *, code: str = "protocol_error") -> None:
        self.code = code
        super().__init__(message)


K_LANES_CAPABILITY = "lanes"  # HELLO: this end keeps one link per (party, lane), so lanes may run side by side
K_LANE_PREFIX = "lane="  # HELLO of a sender: which lane of its peer's links this connection is ("lane=2")
K_MAX_LANES = 16  # lanes per peer (``link.lanes_per_peer`` <= this)


def lane_capability(index: int) -> str:
    """The HELLO capability that names lane ``index``."""
    return f"{K_LANE_PREFIX}{index}"


def lane_of(capabilities: frozenset[str]) -> int:
    """The lane a peer's HELLO names (0 without one); LinkProtocolViolation if it is malformed."""
    named = [c for c in capabilities if c.startswith(K_LANE_PREFIX)]
    if not named:
        return 0
    text = named[0][len(K_LANE_PREFIX):]
    if len(named) > 1 or not text.isdigit() or len(text) > 2 or not 0 <= int(text) < K_MAX_LANES:
        raise LinkProtocolViolation(f"HELLO names lanes {sorted(named)}: need one lane=N with 0 <= N < {K_MAX_LANES}")
    return int(text)


@dataclass(frozen=True, slots=True)
class LinkParams:
    """What one end of a link offers; the pure slice of :class:`fedgate.config.LinkConfig`."""

    local_party: str
    """Our party id, sent in HELLO (the peer checks it against our certificate)."""
    chunk_bytes: int = 1024 * 1024
    """Largest MSG payload we send or accept, in bytes; the smaller of both ends' is used."""
    window_bytes: int = 64 * 1024 * 1024
    """Receiver: credit granted to the sender, in bytes (payload plus K_FRAME_CHARGE per frame)."""
    keepalive_s: float = 10.0
    """Seconds between PINGs; three of the peer's intervals without a byte is a timeout."""
    handshake_timeout_s: float = 10.0
    """Seconds to complete the HELLO exchange."""
    max_message_bytes: int = 2**32
    """Largest message payload accepted, in bytes."""
    capabilities: frozenset[str] = field(default_factory=lambda: frozenset({"resume", "credit", K_LANES_CAPABILITY}))
    """Capability names advertised in HELLO (informational in version 1, except the lanes ones)."""

    @classmethod
    def from_config(cls, config: LinkConfig, *, local_party: str, max_message_bytes: int = 2**32) -> LinkParams:
        """The link's slice of ``[link]`` (``connect_timeout_s`` bounds the HELLO exchange too)."""
        return cls(
            local_party=local_party, chunk_bytes=config.chunk_bytes, window_bytes=config.window_bytes,
            keepalive_s=config.keepalive_s, handshake_timeout_s=config.connect_timeout_s,
            max_message_bytes=max_message_bytes,
        )


class LinkCore:
    """Shared machinery; use :class:`~fedgate.proxy.link_send.LinkSenderCore` or ``LinkReceiverCore``."""

    role = ""
    peer_role = ""

    def __init__(
        self, params: LinkParams, *, now: float, expected_peer: str | None = None,
        authenticated_peer: str | None = None, wall_time: float | None = None,
    ) -> None:
        if params.window_bytes < params.chunk_bytes + K_FRAME_CHARGE:
            raise ValueError("window_bytes must hold at least one full chunk")
        self.params = params
        self.expected_peer = expected_peer
        self.authenticated_peer = authenticated_peer
        self.state = LinkState.HANDSHAKE
        self.peer_party: str | None = None
        self.version = 0
        self.chunk_bytes = params.chunk_bytes
        self.error: FedgateError | None = None
        self._decoder = FrameDecoder(max_payload=params.chunk_bytes)
        self._out: list[bytes | memoryview] = []
        self._small = bytearray()
        self._deadline = now + params.handshake_timeout_s
        self._last_recv = now
        self._next_ping = now + params.keepalive_s
        self._peer_keepalive = params.keepalive_s
        self._ping_token: float | None = None
        self._close_code = ""
        self._pause = False
        """Set by a subclass to stop parsing after the current frame (see receive_data)."""
        self._wall_time = wall_time
        self._emit(HELLO, self._hello())

    # -- input ------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes, *, now: float) -> list[LinkEvent]:
        """Feed bytes from the channel (``b""`` = end of stream) and return the first events.

        Parsing pauses after each :class:`ChunkReceived` (the adapter's answer, e.g. ``resume``, may
        change how the following frames are read): call :meth:`next_events` until it returns [].
        """
        events: list[LinkEvent] = []
        if self.state in (LinkState.CLOSED, LinkState.ERROR):
            return events
        self._last_recv = now
        if not data:
            self.state = LinkState.CLOSED
            code = self._close_code or "eof"
            events.append(ConnectionTerminated(code, "the peer closed the connection", by_peer=True))
            return events
        self._decoder.feed(data)
        return self.next_events(now=now)

    def next_events(self, *, now: float) -> list[LinkEvent]:
        """Parse buffered frames up to the next pause point (see :meth:`receive_data`)."""
        events: list[LinkEvent] = []
        try:
            self._pause = False
            while not self._pause and self.state not in (LinkState.CLOSED, LinkState.ERROR):
                frame = self._decoder.next_frame()
                if frame is None:
                    break
                self._dispatch(frame, now, events)
        except FedgateError as exc:
            self._fail(exc, events)
        except Exception as exc:  # a bug of ours; the link still fails cleanly
            self._fail(LocalError(f"internal error handling input: {exc!r}"), events)
        return events

    def _dispatch(self, frame: Frame, now: float, events: list[LinkEvent]) -> None:
        if self.state is LinkState.HANDSHAKE and frame.type != CLOSE:
            if frame.type != HELLO:
                raise LinkProtocolViolation("expected HELLO as the first frame: not a fedgate link peer")
            self._on_hello(frame.header, events)
            self.state = LinkState.OPEN
            self._deadline = 0.0
            self._next_ping = now  # a first RTT sample right away
            return
        if frame.type == HELLO:
            raise LinkProtocolViolation("HELLO received twice")
        if frame.type == PING:
            self._emit(PONG, {"t": get_float(frame.header, "t", PING)})
        elif frame.type == PONG:
            token = get_float(frame.header, "t", PONG)
            if token == self._ping_token:
                self._ping_token = None
                events.append(RttMeasured(max(0.0, now - token)))
        elif frame.type == CLOSE:
            code = get_str(frame.header, "code", CLOSE, default="normal")
            reason = get_str(frame.header, "reason", CLOSE, default="", max_len=K_MAX_REASON * 4)
            if self.state is LinkState.CLOSING:
                events.append(ConnectionTerminated(self._close_code, reason, by_peer=False))
            else:
                self._emit(CLOSE, {"code": code, "reason": "closing as asked"})
                events.append(ConnectionTerminated(code, reason, by_peer=True))
            self.state = LinkState.CLOSED
        else:
            self._on_frame(frame, now, events)

    def _on_hello(self, h: dict[str, Any], events: list[LinkEvent]) -> None:
        if h.get("magic") != K_MAGIC:
            raise LinkProtocolViolation("HELLO without the fedgate-link magic: not a fedgate link peer")
        theirs = {v for v in get_list(h, "v", HELLO) if isinstance(v, int) and not isinstance(v, bool)}
        common = theirs.intersection(K_VERSIONS)
        if not common:
            raise LinkProtocolViolation(
                f"no common protocol version: peer speaks {sorted(theirs)}, we speak {list(K_VERSIONS)}",
                code="version",
            )
        self.version = max(common)
        party = get_str(h, "party", HELLO)
        if get_str(h, "role", HELLO) != self.peer_role:
            raise LinkProtocolViolation(f"peer must be a link {self.peer_role}")
        if self.authenticated_peer is not None and party != self.authenticated_peer:
            raise LinkProtocolViolation(
                f"peer claims party {party!r} but its certificate says {self.authenticated_peer!r}",
                code="unauthorized",
            )
        if self.expected_peer is not None and party != self.expected_peer:
            raise LinkProtocolViolation(
                f"wrong party: expected {self.expected_peer!r}, the peer is {party!r}", code="unauthorized"
            )
        self.peer_party = party
        self.chunk_bytes = min(self.params.chunk_bytes, get_int(h, "k", HELLO, lo=1, hi=2**32))
        self._peer_keepalive = get_float(h, "ka", HELLO)
        if not 0 < self._peer_keepalive <= 3600:
            raise LinkProtocolViolation("HELLO keepalive must be in (0, 3600] seconds")
        caps = frozenset(c for c in get_list(h, "caps", HELLO, default=[]) if isinstance(c, str))
        peer_wall = get_float(h, "t", HELLO) if "t" in h else None
        self._on_handshake(h)
        events.append(HandshakeCompleted(party, self.version, caps, self.chunk_bytes, peer_wall))

    def _on_handshake(self, h: dict[str, Any]) -> None:
        """Role-specific HELLO checks (the sender reads its credit here)."""

    def _on_frame(self, frame: Frame, now: float, events: list[LinkEvent]) -> None:
        raise NotImplementedError

    def _hello(self) -> dict[str, Any]:
        return {
            "magic": K_MAGIC, "v": list(K_VERSIONS), "party": self.params.local_party, "role": self.role,
            "caps": sorted(self.params.capabilities), "k": self.params.chunk_bytes,
            "w": self.params.window_bytes, "ka": self.params.keepalive_s, "m": self.params.max_message_bytes,
            **({"t": self._wall_time} if self._wall_time is not None else {}),
        }

    # -- timers -----------------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next run (same clock as ``now``), or None."""
        if self.state in (LinkState.HANDSHAKE, LinkState.CLOSING):
            return self._deadline
        if self.state is LinkState.OPEN:
            return min(self._next_ping, self._last_recv + 3 * self._peer_keepalive)
        return None

    def handle_timer(self, *, now: float) -> list[LinkEvent]:
        events: list[LinkEvent] = []
        if self.state is LinkState.HANDSHAKE and now >= self._deadline:
            self._fail(LinkProtocolViolation("handshake timed out", code="timeout"), events)
        elif self.state is LinkState.CLOSING and now >= self._deadline:
            self.state = LinkState.CLOSED
            events.append(ConnectionTerminated(self._close_code, "the peer did not answer CLOSE", by_peer=False))
        elif self.state is LinkState.OPEN:
            silent = now - self._last_recv
            if silent >= 3 * self._peer_keepalive:
                self._fail(LinkProtocolViolation(f"no data from the peer for {silent:.1f} s", code="timeout"), events)
            elif now >= self._next_ping:
                self._ping_token = now
                self._emit(PING, {"t": now})
                self._next_ping = now + self.params.keepalive_s
        return events

    # -- close and errors -------------------------------------------------------------------------------

    def close(self, *, now: float, code: str = "normal", reason: str = "") -> None:
        """Start a graceful close; the peer answers CLOSE and a ConnectionTerminated event follows."""
        if self.state in (LinkState.HANDSHAKE, LinkState.OPEN):
            self._emit(CLOSE, {"code": code, "reason": reason[:K_MAX_REASON]})
            self._close_code = code
            self.state = LinkState.CLOSING
            self._deadline = now + self.params.keepalive_s

    def abort(self, exc: FedgateError) -> ConnectionTerminated | None:
        """Fail the connection from our side (a refused party, a local error): queue CLOSE, go to ERROR."""
        if self.state in (LinkState.CLOSED, LinkState.ERROR):
            return None
        events: list[LinkEvent] = []
        self._fail(exc, events)
        event = events[0]
        assert isinstance(event, ConnectionTerminated)
        return event

    def _fail(self, exc: FedgateError, events: list[LinkEvent]) -> None:
        code = exc.code if isinstance(exc, LinkProtocolViolation) else (
            "protocol_error" if isinstance(exc, RemoteProtocolError) else "internal_error"
        )
        self.state = LinkState.ERROR
        self.error = exc
        self._emit(CLOSE, {"code": code, "reason": str(exc)[:K_MAX_REASON]})
        events.append(ConnectionTerminated(code, str(exc), by_peer=False, error=exc))

    def _check_open(self, what: str) -> None:
        if self.state is LinkState.ERROR:
            raise LocalError(f"cannot {what}: the link is in ERROR state ({self.error})")
        if self.state is not LinkState.OPEN and self.state is not LinkState.CLOSING:
            raise LocalError(f"cannot {what}: the link is {self.state.value}")

    # -- output -----------------------------------------------------------------------------------------

    def _emit(self, ftype: int, header: dict[str, Any] | None = None, payload: memoryview | bytes = b"") -> None:
        self._small += encode_frame(ftype, header, len(payload))
        if not payload:
            return
        if len(payload) < K_COALESCE:
            self._small += payload
        else:
            self._out.append(bytes(self._small))
            self._small.clear()
            self._out.append(payload)

    def data_to_send(self) -> list[bytes | memoryview]:
        """Bytes to write to the channel, in order (large payloads as memoryviews, not copied)."""
        self._prepare_output()
        if self._small:
            self._out.append(bytes(self._small))
            self._small.clear()
        out, self._out = self._out, []
        return out

    def _prepare_output(self) -> None:
        """Subclasses queue pending frames (messages, acks, credit) here."""

