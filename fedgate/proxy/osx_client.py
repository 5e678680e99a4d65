"""gRPC clients of the OSX protocol: the inter-site ``invoke`` hop and the worker-side queue calls.

:class:`OsxForwarder` keeps one channel per peer endpoint (FATE's own client opens one per call;
we do not) and translates gRPC failures into PeerUnavailableError / RejectedError with the endpoint
and the reason. :class:`OsxQueueClient` speaks PrivateTransferTransport like a FATE worker does; the
``fedgate send`` / ``recv`` commands and the proxy benchmark use it.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Mapping

import grpc
import grpc.aio

from fedgate.errors import FedgateError, InvalidRequestError, PeerUnavailableError, RejectedError
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.protos import osx_pb2, osx_pb2_grpc
from fedgate.proxy.routing import Endpoint

__all__ = [
    "K_CODE_OK",
    "K_CODE_TIMEOUT",
    "OsxForwarder",
    "OsxQueueClient",
    "channel_options",
    "headers_for",
    "server_options",
]

K_CODE_OK = "E0000000000"
K_CODE_INVALID = "E0000000400"
K_CODE_SYSTEM = "E0000000500"
K_CODE_TIMEOUT = "E0000000601"
K_CODE_NETWORK = "E0000000607"
K_MESSAGE_ID_HEADER = "x-fedgate-message-id"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Server-side options: message sizes, and tolerate clients' keepalive pings during long pops."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def headers_for(envelope: Envelope) -> list[tuple[str, str]]:
    """The x-ptp headers a push of ``envelope`` carries (plus fedgate's message id)."""
    headers = {k: v for k, v in envelope.metadata.items() if k.startswith("x-ptp-")}
    headers["x-ptp-session-id"] = envelope.session_id
    headers["x-ptp-target-node-id"] = envelope.dst_party
    headers["x-ptp-from-node-id"] = envelope.src_party
    headers.setdefault("x-ptp-tech-provider-code", "FATE")
    headers[K_MESSAGE_ID_HEADER] = envelope.message_id
    return sorted(headers.items())


def _read(path: pathlib.Path | str | None) -> bytes | None:
    if not path:
        return None
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise PeerUnavailableError(f"cannot read TLS file {path}: {exc.strerror}") from exc


class OsxForwarder:
    """Forwards Envelopes to peer gateways (fedgate or a real OSX broker) with ``invoke``."""

    def __init__(self, *, max_message_bytes: int, timeout: float) -> None:
        self._max = max_message_bytes
        self._timeout = timeout
        self._channels: dict[tuple[str, int, bool], grpc.aio.Channel] = {}

    def _channel(self, endpoint: Endpoint) -> grpc.aio.Channel:
        key = (endpoint.host, endpoint.port, endpoint.use_tls)
        channel = self._channels.get(key)
        if channel is None:
            target = f"{endpoint.host}:{endpoint.port}"
            options = channel_options(self._max)
            if endpoint.use_tls:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_read(endpoint.ca_file),
                    private_key=_read(endpoint.key_file),
                    certificate_chain=_read(endpoint.cert_file),
                )
                channel = grpc.aio.secure_channel(target, creds, options=options)
            else:
                channel = grpc.aio.insecure_channel(target, options=options)
            self._channels[key] = channel
        return channel

    async def invoke(self, endpoint: Endpoint, envelope: Envelope, *, timeout: float | None = None) -> None:
        """Hand ``envelope`` to the peer; returns once the peer has stored (or forwarded) it."""
        push = osx_pb2.PushInbound(topic=envelope.topic, payload=envelope.payload)
        headers = headers_for(envelope)
        request = osx_pb2.Inbound(metadata=dict(headers), payload=push.SerializeToString())
        stub = osx_pb2_grpc.PrivateTransferProtocolStub(self._channel(endpoint))
        where = f"{endpoint.host}:{endpoint.port} ({'TLS' if endpoint.use_tls else 'plain text'})"
        try:
            reply = await stub.invoke(request, metadata=headers, timeout=timeout or self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, where) from exc
        if reply.code != K_CODE_OK:
            if reply.code == K_CODE_INVALID:
                raise InvalidRequestError(f"peer {where} refused the message: {reply.message}")
            if "rejected by audit rule" in reply.message:
                raise RejectedError("peer", f"peer {where}: {reply.message}")
            raise PeerUnavailableError(f"peer {where} answered {reply.code}: {reply.message}")

    async def aclose(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)


def _translate(exc: grpc.aio.AioRpcError, where: str) -> FedgateError:
    code = exc.code()
    detail = exc.details() or ""
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return RejectedError("peer", f"peer {where}: {detail}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(f"peer {where} refused the message: {detail}")
    if code == grpc.StatusCode.UNAVAILABLE and ("ssl" in detail.lower() or "handshake" in detail.lower()):
        return PeerUnavailableError(f"TLS to {where} failed: {detail}")
    return PeerUnavailableError(f"{where}: {code.name}: {detail}")


class OsxQueueClient:
    """Push / pop / peek / release against a gateway's PrivateTransferTransport, like a FATE worker."""

    def __init__(self, target: str, *, party: str, max_message_bytes: int = 256 * 1024 * 1024) -> None:
        self.party = party
        self._channel = grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes))
        self._stub = osx_pb2_grpc.PrivateTransferTransportStub(self._channel)

    def _headers(self, session: str, extra: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
        headers = {
            "x-ptp-session-id": session,
            "x-ptp-from-node-id": self.party,
            "x-ptp-tech-provider-code": "FATE",
            "x-ptp-trace-id": "fedgate-cli",
        }
        headers.update(extra or {})
        return list(headers.items())

    async def push(self, *, session: str, topic: str, target: str, payload: bytes, timeout: float = 60.0) -> None:
        reply = await self._stub.push(
            osx_pb2.PushInbound(topic=topic, payload=payload),
            metadata=self._headers(session, {"x-ptp-target-node-id": target}),
            timeout=timeout,
        )
        if reply.code != K_CODE_OK:
            raise PeerUnavailableError(f"push answered {reply.code}: {reply.message}")

    async def pop(self, *, session: str, topic: str, timeout: float) -> bytes | None:
        """The next payload of the queue, or None when ``timeout`` seconds pass first."""
        reply = await self._stub.pop(
            osx_pb2.PopInbound(topic=topic, timeout=int(timeout * 1000)),
            metadata=self._headers(session),
            timeout=timeout + 30,
        )
        if reply.code == K_CODE_TIMEOUT:
            return None
        if reply.code != K_CODE_OK:
            raise PeerUnavailableError(f"pop answered {reply.code}: {reply.message}")
        return bytes(reply.payload)

    async def release(self, *, session: str, topic: str = "") -> None:
        await self._stub.release(osx_pb2.ReleaseInbound(topic=topic), metadata=self._headers(session), timeout=30)

    async def aclose(self) -> None:
        await self._channel.close(None)
