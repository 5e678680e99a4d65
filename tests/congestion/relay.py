"""A UDP relay on 127.0.0.1 that can black-hole the path or change its source address (rebinding)."""

from __future__ import annotations

import asyncio
from typing import Any, cast


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, client: Any) -> None:
        self.relay = relay
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.relay.blocked and self.relay.front is not None:
            self.relay.front.sendto(data, self.client)


class UdpRelay(asyncio.DatagramProtocol):
    """Forwards datagrams between clients and ``target``; ``blocked = True`` drops everything."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.blocked = False
        self.front: asyncio.DatagramTransport | None = None
        self._upstreams: dict[Any, _Upstream] = {}
        self._pending: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, target: tuple[str, int]) -> UdpRelay:
        loop = asyncio.get_running_loop()
        relay = cls(target)
        await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
        return relay

    @property
    def port(self) -> int:
        assert self.front is not None
        return int(self.front.get_extra_info("sockname")[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.front = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.blocked:
            return
        upstream = self._upstreams.get(addr)
        if upstream is not None and upstream.transport is not None:
            upstream.transport.sendto(data, self.target)
            return
        if upstream is None:
            upstream = _Upstream(self, addr)
            self._upstreams[addr] = upstream
            task = asyncio.get_running_loop().create_task(self._open(upstream, data))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _open(self, upstream: _Upstream, first: bytes) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: upstream, local_addr=("127.0.0.1", 0))
        assert upstream.transport is not None
        upstream.transport.sendto(first, self.target)

    def rebind(self) -> None:
        """NAT rebinding: later datagrams reach the server from new source ports."""
        for upstream in self._upstreams.values():
            if upstream.transport is not None:
                upstream.transport.close()
        self._upstreams.clear()

    def close(self) -> None:
        for upstream in self._upstreams.values():
            if upstream.transport is not None:
                upstream.transport.close()
        if self.front is not None:
            self.front.close()
