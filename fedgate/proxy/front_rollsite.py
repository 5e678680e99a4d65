"""The rollsite front: EggRoll's ``DataTransferService`` and ``RouteService``.

Rules of this module:

1. ``push`` streams are routed by ``Packet.header.dst`` (or ``RollSiteHeader.dstPartyId`` /
   ``dstRole`` in ``Metadata.ext`` when set). Towards a ``grpc`` endpoint the stream is relayed packet
   by packet to the next hop and its answer returned; towards a link endpoint every packet becomes an
   Envelope in the durable outbox; for a local party every packet is stored durably in the queue
   (session = rollSiteSessionId, topic = ``rollsite:{name}:{tag}``) from which ``pull`` drains it.
2. ``unaryCall`` (FATE-Flow control plane) goes to the ``{party}.fateflow`` route, with the caller's
   deadline honoured (``control_timeout_s`` when the caller set none).
3. Failures fail the RPC with a gRPC status naming the party/role, table or endpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from fedgate.errors import FedgateError, InvalidRequestError, MessageTooLargeError, PeerUnavailableError
from fedgate.proxy.dispatch import K_LINK_TRANSPORTS, Dispatcher
from fedgate.proxy.envelope import Envelope, new_message_id
from fedgate.proxy.osx_client import channel_options
from fedgate.proxy.protos import basic_meta_pb2, proxy_pb2, proxy_pb2_grpc, transfer_pb2
from fedgate.proxy.routing import Endpoint, Router
from fedgate.proxy.rpc import RpcObserver, abort_with
from fedgate.proxy.store import SqliteStore

__all__ = ["DataTransferServicer", "RouteServicer", "packet_destination"]

log = logging.getLogger("fedgate.front.rollsite")


class _PeerRefused(FedgateError):
    """The next hop refused the request; ``grpc_status`` repeats its status."""


def _refusal(status: str) -> type[FedgateError]:
    return type(f"PeerRefused{status.title().replace('_', '')}", (_PeerRefused,), {"grpc_status": status})


# Statuses of a next hop that a retry cannot change; passed on to the client as they are.
_K_FINAL_STATUS: dict[grpc.StatusCode, type[FedgateError]] = {
    code: _refusal(code.name)
    for code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.UNIMPLEMENTED)
}


def _rollsite_header(meta: proxy_pb2.Metadata) -> transfer_pb2.RollSiteHeader | None:
    if not meta.ext:
        return None
    try:
        return transfer_pb2.RollSiteHeader.FromString(meta.ext)
    except Exception as exc:  # protobuf DecodeError: the client's fault
        raise InvalidRequestError(f"Metadata.ext is not a serialized RollSiteHeader: {exc}") from exc


def packet_destination(meta: proxy_pb2.Metadata) -> tuple[str, str, transfer_pb2.RollSiteHeader | None]:
    """(party, role, rollsite header) a packet is addressed to."""
    header = _rollsite_header(meta)
    party = (header.dstPartyId if header and header.dstPartyId else "") or meta.dst.partyId
    role = (header.dstRole if header and header.dstRole else "") or meta.dst.role
    if not party:
        raise InvalidRequestError(
            "packet has no destination: header.dst.partyId and RollSiteHeader.dstPartyId are empty"
        )
    return party, role, header


def _envelope(packet: proxy_pb2.Packet, party: str, role: str, header: transfer_pb2.RollSiteHeader | None) -> Envelope:
    session = header.rollSiteSessionId if header else packet.header.task.taskId
    name = header.name if header else packet.header.src.name
    tag = header.tag if header else packet.header.dst.name
    return Envelope(
        message_id=new_message_id(),
        session_id=session or "rollsite",
        topic=f"rollsite:{name}:{tag}",
        src_party=(header.srcPartyId if header else "") or packet.header.src.partyId,
        dst_party=party,
        src_role=(header.srcRole if header else "") or packet.header.src.role,
        dst_role=role,
        payload=packet.SerializeToString(),
        protocol="rollsite",
        created_at=time.time(),
    )


class DataTransferServicer(proxy_pb2_grpc.DataTransferServiceServicer):
    """push / unaryCall / pull for EggRoll rollsite clients and FATE-Flow."""

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        router: Router,
        store: SqliteStore,
        rpc: RpcObserver,
        max_message_bytes: int,
        control_timeout_s: float,
        forward_timeout_s: float,
    ) -> None:
        self._dispatcher = dispatcher
        self._router = router
        self._store = store
        self._rpc = rpc
        self._max = max_message_bytes
        self._control_timeout = control_timeout_s
        self._forward_timeout = forward_timeout_s
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}

    def _stub(self, endpoint: Endpoint) -> Any:
        # grpc's stubs type the generated stub as synchronous; on an aio channel its calls are awaitable.
        key = (endpoint.host, endpoint.port)
        channel = self._channels.get(key)
        if channel is None:
            channel = grpc.aio.insecure_channel(f"{endpoint.host}:{endpoint.port}", options=channel_options(self._max))
            self._channels[key] = channel
        return proxy_pb2_grpc.DataTransferServiceStub(channel)

    async def aclose(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    async def push(
        self, request_iterator: AsyncIterator[proxy_pb2.Packet], context: grpc.aio.ServicerContext[object, object]
    ) -> proxy_pb2.Metadata:
        with self._rpc.observe("rollsite.push") as outcome:
            try:
                return await self._push(request_iterator)
            except FedgateError as exc:
                outcome.code = exc.grpc_status
                await abort_with(context, exc)

    async def _push(self, packets: AsyncIterator[proxy_pb2.Packet]) -> proxy_pb2.Metadata:
        iterator = packets.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise InvalidRequestError("push stream carried no packet") from None
        party, role, _ = packet_destination(first.header)
        if self._dispatcher.is_local(party) or self._is_link_route(party, role):
            # A stream is stored whole or not at all: every packet passes the audit chain first
            # (EggRoll streams are at most 10 packets of 100 kB; the total is capped anyway).
            envelopes: list[Envelope] = []
            size = 0
            packet: proxy_pb2.Packet | None = first
            while packet is not None:
                p_party, p_role, p_header = packet_destination(packet.header)
                envelope = _envelope(packet, p_party, p_role, p_header)
                size += envelope.size
                if size > self._max:
                    raise MessageTooLargeError(
                        f"push stream exceeds {self._max} bytes (front.max_message_bytes); split it into streams"
                    )
                await self._dispatcher.inspect(envelope)
                envelopes.append(envelope)
                packet = await anext(iterator, None)
            for envelope in envelopes:
                await self._dispatcher.dispatch(envelope, inspected=True)
            reply = proxy_pb2.Metadata()
            reply.CopyFrom(first.header)
            reply.seq = len(envelopes)
            return reply
        return await self._relay(first, iterator, party, role)

    def _is_link_route(self, party: str, role: str) -> bool:
        route = self._router.route(party, role or "default", now=time.monotonic())
        return any(ep.transport in K_LINK_TRANSPORTS for ep in route.endpoints)

    async def _relay(
        self, first: proxy_pb2.Packet, rest: AsyncIterator[proxy_pb2.Packet], party: str, role: str
    ) -> proxy_pb2.Metadata:
        route = self._router.route(party, role or "default", now=time.monotonic())
        endpoint = route.endpoints[0]

        async def packets() -> AsyncIterator[proxy_pb2.Packet]:
            yield first
            async for packet in rest:
                yield packet

        try:
            reply: proxy_pb2.Metadata = await self._stub(endpoint).push(packets(), timeout=self._forward_timeout)
        except grpc.aio.AioRpcError as exc:
            text = (f"relaying to party {party} role {role or 'default'} via {endpoint.host}:{endpoint.port} "
                    f"failed: {exc.code().name}: {exc.details()}")
            final = _K_FINAL_STATUS.get(exc.code())
            if final is not None:
                # The next hop refused the stream itself: pass its verdict on unchanged. UNAVAILABLE
                # would make eggroll resend the whole stream three times, five minutes apart.
                raise final(text) from exc
            self._router.report_failure(endpoint, now=time.monotonic(), reason=exc.details() or exc.code().name)
            raise PeerUnavailableError(text) from exc
        self._router.report_success(endpoint, now=time.monotonic())
        return reply

    async def unaryCall(
        self, request: proxy_pb2.Packet, context: grpc.aio.ServicerContext[object, object]
    ) -> proxy_pb2.Packet:
        with self._rpc.observe("rollsite.unaryCall") as outcome:
            try:
                party = request.header.dst.partyId
                if not party:
                    raise InvalidRequestError("unaryCall: header.dst.partyId is empty")
                role = request.header.dst.role or "fateflow"
                route = self._router.route(party, role, now=time.monotonic())
                remaining = context.time_remaining()
                timeout = remaining if remaining is not None and remaining > 0 else self._control_timeout
                return await self._unary(request, route.endpoints, party, role, timeout)
            except FedgateError as exc:
                outcome.code = exc.grpc_status
                await abort_with(context, exc)

    async def _unary(
        self, request: proxy_pb2.Packet, endpoints: tuple[Endpoint, ...], party: str, role: str, timeout: float
    ) -> proxy_pb2.Packet:
        failures = []
        deadline = time.monotonic() + timeout
        for endpoint in endpoints:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                reply: proxy_pb2.Packet = await self._stub(endpoint).unaryCall(request, timeout=left)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise PeerUnavailableError(
                        f"{role} call to party {party} via {endpoint.host}:{endpoint.port}: "
                        f"{exc.code().name}: {exc.details()}"
                    ) from exc
                self._router.report_failure(endpoint, now=time.monotonic(), reason=exc.details() or "unavailable")
                failures.append(f"{endpoint.host}:{endpoint.port}: {exc.details()}")
                continue
            self._router.report_success(endpoint, now=time.monotonic())
            return reply
        raise PeerUnavailableError(
            f"{role} of party {party} unreachable within {timeout:g} s: " + ("; ".join(failures) or "deadline passed")
        )

    async def pull(
        self, request: proxy_pb2.Metadata, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[proxy_pb2.Packet]:
        """Drain the packets stored locally for (task id or session, ``rollsite:{src.name}:{dst.name}``)."""
        header = _rollsite_header(request)
        session = (header.rollSiteSessionId if header else "") or request.task.taskId or "rollsite"
        name = header.name if header else request.src.name
        tag = header.tag if header else request.dst.name
        wait = request.conf.overallTimeout / 1000 if request.conf.overallTimeout > 0 else 0.0
        while True:
            envelope = await self._store.pop(session, f"rollsite:{name}:{tag}", timeout=wait)
            if envelope is None:
                return
            yield proxy_pb2.Packet.FromString(envelope.payload)

    async def polling(
        self, request_iterator: AsyncIterator[proxy_pb2.PollingFrame], context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[proxy_pb2.PollingFrame]:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "fedgate does not serve rollsite polling; route the NAT'd party over a fedgate link (transport tcp/quic)",
        )
        yield proxy_pb2.PollingFrame()  # pragma: no cover - abort raises


class RouteServicer(proxy_pb2_grpc.RouteServiceServicer):
    """``RouteService.query``: where does a (party, role) go, according to the route table."""

    def __init__(self, *, router: Router, rpc: RpcObserver) -> None:
        self._router = router
        self._rpc = rpc

    async def query(
        self, request: proxy_pb2.Topic, context: grpc.aio.ServicerContext[object, object]
    ) -> basic_meta_pb2.Endpoint:
        with self._rpc.observe("route.query") as outcome:
            try:
                route = self._router.route(request.partyId, request.role or "default", now=time.monotonic())
            except FedgateError as exc:
                outcome.code = exc.grpc_status
                await abort_with(context, exc)
            endpoint = route.endpoints[0]
            return basic_meta_pb2.Endpoint(ip=endpoint.host, port=endpoint.port, hostname=endpoint.host)
