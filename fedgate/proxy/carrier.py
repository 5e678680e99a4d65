"""The Carrier seam: how the link protocol reaches a peer gateway.

A carrier opens a reliable, ordered, authenticated byte channel to a peer gateway. The link
protocol (framing, acks, credits, resume) runs over any carrier unchanged. Carriers are chosen per
route endpoint (``transport = "tcp" | "quic" | "rdma"``) and registered by name in one place
(:mod:`fedgate.proxy.carriers`); heavy ones (pyverbs) are imported only when selected.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = ["ByteChannel", "Carrier", "CarrierServer", "ChannelHandler"]


class ByteChannel(Protocol):
    """A reliable, ordered byte channel to one peer."""

    @property
    def peer_party(self) -> str | None:
        """Party id proven by the peer's certificate, or None on an insecure channel."""

    @property
    def description(self) -> str:
        """Human-readable peer description for logs (``tcp 10.0.0.2:9371``)."""

    async def send(self, data: bytes | memoryview) -> None:
        """Queue ``data`` for sending; waits while the carrier's send buffer is full."""

    async def receive(self) -> bytes:
        """The next bytes received (any size > 0); ``b""`` at a clean end of stream."""

    async def aclose(self) -> None:
        """Close the channel; idempotent."""


ChannelHandler = Callable[[ByteChannel], Awaitable[None]]


class CarrierServer(Protocol):
    """A listening carrier; ``aclose`` stops accepting and closes open channels."""

    @property
    def port(self) -> int: ...

    async def aclose(self) -> None: ...


class Carrier(Protocol):
    """A transport technology for links between gateways."""

    @property
    def name(self) -> str: ...

    async def connect(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None, timeout: float,
        lane: int = 0,
    ) -> ByteChannel:
        """Open a channel; raises PeerUnavailableError with the endpoint and the reason.

        ``lane`` is the link lane the channel is for (``link.lanes_per_peer``); a carrier that
        multiplexes channels over one connection per peer (QUIC) opens one connection per lane.
        """

    async def listen(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, handler: ChannelHandler
    ) -> CarrierServer:
        """Accept channels and run ``handler`` for each one."""
