"""The OSX front: ``org.ppc.ptp.PrivateTransferTransport`` (FATE 2.x workers) and
``org.ppc.ptp.PrivateTransferProtocol`` (the inter-site hop from peer gateways or OSX brokers).

Rules of this module:

1. A failed push fails the RPC with a gRPC status: the python OSX client ignores the ``code`` field
   on push, and would believe a rejected message was delivered.
2. Pop consumes. A pop cancelled after its message left the queue puts the message back at the
   head, so a client that goes away while parked loses nothing.
3. Pop answers ``E0000000601`` when its long-poll expires (the client turns it into LookupError).
4. ``invoke`` answers with an ``Outbound`` carrying an OSX code (the inter-site convention), so a
   real OSX broker can sit on the other side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping

import grpc
import grpc.aio

from fedgate.errors import FedgateError, InvalidRequestError
from fedgate.proxy.dispatch import Dispatcher
from fedgate.proxy.envelope import Envelope, new_message_id
from fedgate.proxy.osx_client import K_CODE_INVALID, K_CODE_OK, K_CODE_SYSTEM, K_CODE_TIMEOUT, K_MESSAGE_ID_HEADER
from fedgate.proxy.protos import osx_pb2, osx_pb2_grpc
from fedgate.proxy.rpc import RpcObserver, abort_with
from fedgate.proxy.store import SqliteStore

__all__ = ["OsxProtocolServicer", "OsxTransportServicer", "envelope_from_push"]

log = logging.getLogger("fedgate.front.osx")

K_SOURCE_HEADERS = ("x-ptp-from-node-id", "x-ptp-source-node-id")


def _metadata(context: grpc.aio.ServicerContext[object, object]) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _require(headers: Mapping[str, str], name: str, call: str) -> str:
    value = headers.get(name, "")
    if not value:
        raise InvalidRequestError(f"{call}: missing gRPC metadata header {name!r}")
    return value


def envelope_from_push(topic: str, payload: bytes, headers: Mapping[str, str], call: str = "push") -> Envelope:
    """Build the Envelope of an OSX push from its topic, payload and x-ptp headers."""
    session = _require(headers, "x-ptp-session-id", call)
    target = _require(headers, "x-ptp-target-node-id", call)
    source = next((headers[h] for h in K_SOURCE_HEADERS if headers.get(h)), "")
    if not source:
        raise InvalidRequestError(
            f"{call}: missing gRPC metadata header 'x-ptp-from-node-id' (or 'x-ptp-source-node-id')"
        )
    if not topic:
        raise InvalidRequestError(f"{call}: empty topic")
    src_role = dst_role = ""
    # Queue-mode topics are {session}-{srcRole}-{srcParty}-{dstRole}-{dstParty}-{name}.
    if topic.startswith(session + "-"):
        parts = topic[len(session) + 1 :].split("-", 4)
        if len(parts) == 5 and parts[1] == source and parts[3] == target:
            src_role, dst_role = parts[0], parts[2]
    return Envelope(
        message_id=headers.get(K_MESSAGE_ID_HEADER) or new_message_id(),
        session_id=session,
        topic=topic,
        src_party=source,
        dst_party=target,
        src_role=src_role,
        dst_role=dst_role,
        payload=payload,
        metadata={k: v for k, v in headers.items() if k.startswith("x-ptp-")},
        protocol="osx",
        created_at=time.time(),
    )


class OsxTransportServicer(osx_pb2_grpc.PrivateTransferTransportServicer):
    """push / pop / peek / release for the party's own FATE workers."""

    def __init__(
        self, *, dispatcher: Dispatcher, store: SqliteStore, max_pop_wait_s: float, rpc: RpcObserver
    ) -> None:
        self._rpc = rpc
        self._dispatcher = dispatcher
        self._store = store
        self._max_wait = max_pop_wait_s

    async def push(
        self, request: osx_pb2.PushInbound, context: grpc.aio.ServicerContext[object, object]
    ) -> osx_pb2.TransportOutbound:
        with self._rpc.observe("push") as outcome:
            try:
                envelope = envelope_from_push(request.topic, request.payload, _metadata(context))
                await self._dispatcher.dispatch(envelope)
            except FedgateError as exc:
                outcome.code = exc.grpc_status
                await abort_with(context, exc)
            return osx_pb2.TransportOutbound(code=K_CODE_OK, message="success")

    async def pop(
        self, request: osx_pb2.PopInbound, context: grpc.aio.ServicerContext[object, object]
    ) -> osx_pb2.TransportOutbound:
        with self._rpc.observe("pop", timed=False) as outcome:
            headers = _metadata(context)
            try:
                session = _require(headers, "x-ptp-session-id", "pop")
                if not request.topic:
                    raise InvalidRequestError("pop: empty topic")
                wait = min(request.timeout / 1000 if request.timeout > 0 else self._max_wait, self._max_wait)
                envelope = await self._store.pop(session, request.topic, timeout=wait)
            except LookupError as exc:
                return osx_pb2.TransportOutbound(code=K_CODE_TIMEOUT, message=str(exc))
            except FedgateError as exc:
                outcome.code = exc.grpc_status
                await abort_with(context, exc)
            if envelope is None:
                return osx_pb2.TransportOutbound(
                    code=K_CODE_TIMEOUT, message=f"no message on topic {request.topic!r} within {wait:g} s"
                )
            return osx_pb2.TransportOutbound(code=K_CODE_OK, message="success", payload=envelope.payload)

    async def peek(
        self, request: osx_pb2.PeekInbound, context: grpc.aio.ServicerContext[object, object]
    ) -> osx_pb2.TransportOutbound:
        with self._rpc.observe("peek") as outcome:
            try:
                session = _require(_metadata(context), "x-ptp-session-id", "peek")
                envelope = await self._store.peek(session, request.topic)
            except FedgateError as exc:
                outcome.code = exc.grpc_status
                await abort_with(context, exc)
            if envelope is None:
                return osx_pb2.TransportOutbound(code=K_CODE_TIMEOUT, message=f"topic {request.topic!r} is empty")
            return osx_pb2.TransportOutbound(code=K_CODE_OK, message="success", payload=envelope.payload)

    async def release(
        self, request: osx_pb2.ReleaseInbound, context: grpc.aio.ServicerContext[object, object]
    ) -> osx_pb2.TransportOutbound:
        with self._rpc.observe("release") as outcome:
            try:
                session = _require(_metadata(context), "x-ptp-session-id", "release")
                dropped = await self._store.release(session, request.topic)
            except FedgateError as exc:
                outcome.code = exc.grpc_status
                await abort_with(context, exc)
            log.info("released", extra={"fields": {"session": session, "topic": request.topic or "*",
                                                    "dropped": dropped}})
            return osx_pb2.TransportOutbound(code=K_CODE_OK, message=f"released {dropped} message(s)")


class OsxProtocolServicer(osx_pb2_grpc.PrivateTransferProtocolServicer):
    """The inter-site hop: a peer hands us a serialized PushInbound with its x-ptp headers."""

    def __init__(self, *, dispatcher: Dispatcher, rpc: RpcObserver) -> None:
        self._rpc = rpc
        self._dispatcher = dispatcher

    async def _handle(self, request: osx_pb2.Inbound, call_headers: Mapping[str, str]) -> osx_pb2.Outbound:
        headers = dict(call_headers)
        headers.update(request.metadata)
        try:
            push = osx_pb2.PushInbound.FromString(request.payload)
        except Exception:  # protobuf's DecodeError; any malformed input is the peer's fault
            return osx_pb2.Outbound(code=K_CODE_INVALID, message="invoke: payload is not a serialized PushInbound")
        try:
            envelope = envelope_from_push(push.topic, push.payload, headers, call="invoke")
            deduplicate = K_MESSAGE_ID_HEADER in headers
            await self._dispatcher.dispatch(envelope, direction="inbound", deduplicate=deduplicate)
        except InvalidRequestError as exc:
            return osx_pb2.Outbound(code=K_CODE_INVALID, message=str(exc))
        except FedgateError as exc:
            return osx_pb2.Outbound(code=K_CODE_SYSTEM, message=f"{exc.grpc_status}: {exc}")
        return osx_pb2.Outbound(code=K_CODE_OK, message="success")

    async def invoke(
        self, request: osx_pb2.Inbound, context: grpc.aio.ServicerContext[object, object]
    ) -> osx_pb2.Outbound:
        with self._rpc.observe("invoke") as outcome:
            reply = await self._handle(request, _metadata(context))
            outcome.code = "OK" if reply.code == K_CODE_OK else reply.code
            return reply

    async def transport(
        self, request_iterator: AsyncIterator[osx_pb2.Inbound], context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[osx_pb2.Outbound]:
        headers = _metadata(context)
        async for request in request_iterator:
            yield await self._handle(request, headers)
