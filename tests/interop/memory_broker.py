"""A throwaway in-memory OSX queue broker that records what the real FATE client sends.

It is a test double, not a product: it lets the interop drivers run (and the wire behaviour of
pyfate be pinned in tests) without a fedgate gateway. Rules of this file:

- One broker serves every party (a "shared broker"): a push is stored whatever its target node,
  queues are keyed by (``x-ptp-session-id``, topic) and are FIFO; pop long-polls up to the
  request's ``timeout`` (milliseconds) and answers ``E0000000601`` on expiry.
- Release is recorded but drops nothing unless ``drop_on_release``: FATE's release carries only the
  session id (no party), so on a broker shared by all parties the first party to finish would
  drop messages its peers have not read yet. A per-party proxy drops the session's queues.
- Every call is recorded as a frozen :class:`BrokerCall` (method, metadata, topic, sizes, the
  parsed JSON head of pushed messages), so tests can assert on what FATE really sends.
- Runs in-process on a thread-pool gRPC server bound to 127.0.0.1; ``close()`` stops it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from fedgate.proxy.protos import osx_pb2, osx_pb2_grpc

__all__ = ["K_CODE_OK", "K_CODE_TIMEOUT", "BrokerCall", "MemoryBroker"]

K_CODE_OK = "E0000000000"
K_CODE_TIMEOUT = "E0000000601"
K_CODE_INVALID = "E0000000400"
K_MAX_WORKERS = 128  # threads: one per parked pop plus the pushes
K_MAX_MESSAGE = (2 << 30) - 1  # bytes: what FATE's own channel options allow
K_NO_DEADLINE = 1e9  # seconds: a remaining time above this means the client set no deadline


@dataclass(frozen=True, slots=True)
class BrokerCall:
    """One RPC as the broker saw it."""

    method: str
    """``push``, ``pop``, ``peek`` or ``release``."""
    metadata: dict[str, str]
    """The gRPC invocation metadata (lower-case keys), user-agent and grpc-* keys included."""
    topic: str
    """The request's topic (empty for a whole-session release)."""
    timeout_ms: int = 0
    """``PopInbound.timeout`` / ``ReleaseInbound.timeout``, milliseconds."""
    deadline_s: float | None = None
    """The gRPC deadline the client set, seconds remaining at arrival (None: no deadline)."""
    payload_size: int = 0
    """Size of ``PushInbound.payload`` in bytes."""
    body_size: int = 0
    """Size of ``Message.body`` in bytes."""
    msg_id: str = ""
    """``Message.msgId`` of a pushed message."""
    head: dict[str, Any] = field(default_factory=dict)
    """The JSON head of a pushed message, parsed."""
    push_metadata_field: dict[str, str] = field(default_factory=dict)
    """``PushInbound.metadata`` (the map field, not the gRPC headers)."""
    peer: str = ""
    """The client's address as gRPC reports it."""


class _Queues:
    """FIFO queues keyed by (session, topic) with blocking pop; thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[tuple[str, str], deque[bytes]] = {}

    def push(self, session: str, topic: str, payload: bytes) -> None:
        with self._cond:
            self._queues.setdefault((session, topic), deque()).append(payload)
            self._cond.notify_all()

    def pop(self, session: str, topic: str, timeout_s: float) -> bytes | None:
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                q = self._queues.get((session, topic))
                if q:
                    return q.popleft()
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def peek(self, session: str, topic: str) -> bytes | None:
        with self._cond:
            q = self._queues.get((session, topic))
            return q[0] if q else None

    def release(self, session: str, topic: str) -> int:
        with self._cond:
            keys = [k for k in self._queues if k[0] == session and (not topic or k[1] == topic)]
            dropped = sum(len(self._queues.pop(k)) for k in keys)
            self._cond.notify_all()
            return dropped

    def depth(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())


class _Servicer(osx_pb2_grpc.PrivateTransferTransportServicer):
    def __init__(self, broker: MemoryBroker) -> None:
        self._b = broker

    def push(self, request: osx_pb2.PushInbound, context: grpc.ServicerContext) -> osx_pb2.TransportOutbound:
        md = _metadata(context)
        msg = osx_pb2.Message()
        head: dict[str, Any] = {}
        try:
            msg.ParseFromString(request.payload)
            head = json.loads(msg.head.decode("utf-8")) if msg.head else {}
        except (ValueError, UnicodeDecodeError):
            head = {"_unparsable": True}
        self._b._record(
            BrokerCall(
                method="push",
                metadata=md,
                topic=request.topic,
                deadline_s=_deadline(context),
                payload_size=len(request.payload),
                body_size=len(msg.body),
                msg_id=msg.msgId,
                head=head,
                push_metadata_field=dict(request.metadata),
                peer=context.peer(),
            )
        )
        session = md.get("x-ptp-session-id", "")
        if not session or not request.topic:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "push needs x-ptp-session-id and a topic")
        self._b.queues.push(session, request.topic, request.payload)
        return osx_pb2.TransportOutbound(code=K_CODE_OK, message="stored")

    def pop(self, request: osx_pb2.PopInbound, context: grpc.ServicerContext) -> osx_pb2.TransportOutbound:
        md = _metadata(context)
        self._b._record(
            BrokerCall(
                method="pop",
                metadata=md,
                topic=request.topic,
                timeout_ms=request.timeout,
                deadline_s=_deadline(context),
                peer=context.peer(),
            )
        )
        # FATE asks for hours; cap the wait so a broken test cannot hang the suite.
        wait_s = min(request.timeout / 1000.0, self._b.max_pop_wait_s)
        payload = self._b.queues.pop(md.get("x-ptp-session-id", ""), request.topic, wait_s)
        if payload is None:
            return osx_pb2.TransportOutbound(code=K_CODE_TIMEOUT, message="pop timed out")
        return osx_pb2.TransportOutbound(code=K_CODE_OK, payload=payload)

    def peek(self, request: osx_pb2.PeekInbound, context: grpc.ServicerContext) -> osx_pb2.TransportOutbound:
        md = _metadata(context)
        self._b._record(BrokerCall(method="peek", metadata=md, topic=request.topic, peer=context.peer()))
        payload = self._b.queues.peek(md.get("x-ptp-session-id", ""), request.topic)
        if payload is None:
            return osx_pb2.TransportOutbound(code=K_CODE_TIMEOUT, message="empty")
        return osx_pb2.TransportOutbound(code=K_CODE_OK, payload=payload)

    def release(self, request: osx_pb2.ReleaseInbound, context: grpc.ServicerContext) -> osx_pb2.TransportOutbound:
        md = _metadata(context)
        self._b._record(
            BrokerCall(
                method="release",
                metadata=md,
                topic=request.topic,
                timeout_ms=request.timeout,
                peer=context.peer(),
            )
        )
        dropped = 0
        if self._b.drop_on_release:
            dropped = self._b.queues.release(md.get("x-ptp-session-id", ""), request.topic)
        return osx_pb2.TransportOutbound(code=K_CODE_OK, message=f"released {dropped}")


def _deadline(context: grpc.ServicerContext) -> float | None:
    # grpc reports "no deadline" as a huge number of seconds remaining.
    left = context.time_remaining()
    return None if left is None or left > K_NO_DEADLINE else float(left)


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata():
        out[key] = value if isinstance(value, str) else value.decode("latin-1")
    return out


class MemoryBroker:
    """The broker: ``MemoryBroker(port=0)`` binds a free port on 127.0.0.1 and starts serving."""

    def __init__(self, *, port: int = 0, max_pop_wait_s: float = 120.0, drop_on_release: bool = False) -> None:
        self.max_pop_wait_s = max_pop_wait_s
        """Longest a pop is parked, whatever the client asks (seconds)."""
        self.drop_on_release = drop_on_release
        """Whether release drops queues (only right for a broker that serves one party)."""
        self.queues = _Queues()
        self._lock = threading.Lock()
        self._calls: list[BrokerCall] = []
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=K_MAX_WORKERS),
            options=[
                ("grpc.max_send_message_length", K_MAX_MESSAGE),
                ("grpc.max_receive_message_length", K_MAX_MESSAGE),
            ],
        )
        osx_pb2_grpc.add_PrivateTransferTransportServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    def _record(self, call: BrokerCall) -> None:
        with self._lock:
            self._calls.append(call)

    def calls(self, method: str | None = None) -> Sequence[BrokerCall]:
        """A snapshot of the recorded calls, optionally of one method only."""
        with self._lock:
            return [c for c in self._calls if method is None or c.method == method]

    def close(self) -> None:
        self._server.stop(grace=None).wait()
