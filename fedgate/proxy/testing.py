"""In-memory stand-ins for tests and benchmarks: an Outbox, an Inbox and a carrier.

Rules of this module: everything here keeps state in the instance (nothing at module level), follows
the contracts of :mod:`fedgate.proxy.store_api` and :mod:`fedgate.proxy.carrier` to the letter
(durable = "in this object"), and offers knobs to inject faults (``full``, ``cut``).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable

from fedgate.errors import MessageTooLargeError, PeerUnavailableError, StoreFullError
from fedgate.proxy.carrier import ByteChannel, ChannelHandler
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.store_api import OutboxItem

__all__ = ["MemoryCarrier", "MemoryChannel", "MemoryInbox", "MemoryOutbox", "memory_channel_pair"]


class MemoryOutbox:
    """An Outbox in a dict; also answers ``outbox_depth`` like the SQLite store."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._seq = 0
        self._items: dict[str, dict[int, OutboxItem]] = collections.defaultdict(dict)
        self._by_id: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self.acked: list[str] = []
        """Every message id acknowledged, in order (for assertions)."""

    async def put(self, peer: str, envelope: Envelope) -> int:
        self._seq += 1
        self._items[peer][self._seq] = OutboxItem(self._seq, peer, envelope, self._clock())
        self._by_id[envelope.message_id] = self._seq
        async with self._changed:
            self._changed.notify_all()
        return self._seq

    async def pending(self, peer: str, *, after_seq: int, limit: int) -> list[OutboxItem]:
        out: list[OutboxItem] = []
        for seq, item in self._items.get(peer, {}).items():  # insertion order is seq order
            if seq > after_seq:
                out.append(item)
                if len(out) == limit:
                    break
        return out

    async def wait_pending(self, peer: str, *, after_seq: int, timeout: float) -> bool:
        def ready() -> bool:
            return any(s > after_seq for s in self._items.get(peer, {}))

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(ready)
        except TimeoutError:
            return False
        return True

    async def ack(self, peer: str, message_ids: list[str]) -> None:
        for mid in message_ids:
            seq = self._by_id.pop(mid, None)
            if seq is not None and self._items[peer].pop(seq, None) is not None:
                self.acked.append(mid)

    async def outbox_depth(self, peer: str) -> tuple[int, float | None]:
        items = self._items.get(peer, {})
        return len(items), min((i.enqueued_at for i in items.values()), default=None)


class MemoryInbox:
    """An Inbox in dicts; set ``full`` to make every write raise StoreFullError."""

    def __init__(self) -> None:
        self.queues: dict[tuple[str, str], list[Envelope]] = collections.defaultdict(list)
        self.order: list[str] = []
        """Message ids in the order they were stored."""
        self.seen: set[str] = set()
        self.partials: dict[str, bytearray] = {}
        self.full = False
        self.duplicates = 0
        self.appended_bytes = 0
        """Payload bytes ever staged with append_partial (resume keeps this near the payload size)."""
        self.full_refusals = 0
        self.batches = 0
        """Calls of deliver_many."""
        self.max_message: int | None = None
        """Largest payload ``deliver`` takes; larger ones raise MessageTooLargeError."""

    def _check_space(self) -> None:
        if self.full:
            self.full_refusals += 1
            raise StoreFullError("memory inbox is full (test)")

    async def deliver(self, envelope: Envelope) -> bool:
        await asyncio.sleep(0)
        if envelope.message_id in self.seen:
            self.duplicates += 1
            return False
        if self.max_message is not None and envelope.size > self.max_message:
            raise MessageTooLargeError(f"{envelope.size} bytes is over the inbox limit of {self.max_message}")
        self._check_space()
        self.seen.add(envelope.message_id)
        self.queues[(envelope.session_id, envelope.topic)].append(envelope)
        self.order.append(envelope.message_id)
        self.partials.pop(envelope.message_id, None)
        return True

    async def deliver_many(self, envelopes: list[Envelope]) -> list[bool]:
        """All or nothing, like one transaction (the proposed ``InboxBatch`` extension)."""
        await asyncio.sleep(0)
        fresh = [env for env in envelopes if env.message_id not in self.seen]
        if fresh:
            self._check_space()
            if self.max_message is not None and any(env.size > self.max_message for env in fresh):
                raise MessageTooLargeError(f"a message is over the inbox limit of {self.max_message}")
        self.batches += 1
        out = []
        for env in envelopes:
            stored = env.message_id not in self.seen
            if stored:
                self.seen.add(env.message_id)
                self.queues[(env.session_id, env.topic)].append(env)
                self.order.append(env.message_id)
                self.partials.pop(env.message_id, None)
            else:
                self.duplicates += 1
            out.append(stored)
        return out

    async def partial_size(self, message_id: str) -> int:
        return len(self.partials.get(message_id, b""))

    async def append_partial(self, message_id: str, offset: int, chunk: bytes) -> None:
        await asyncio.sleep(0)
        self._check_space()
        staged = self.partials.setdefault(message_id, bytearray())
        if offset != len(staged):
            raise ValueError(f"chunk of {message_id} at {offset}, but {len(staged)} bytes are staged")
        staged += chunk
        self.appended_bytes += len(chunk)

    async def take_partial(self, message_id: str) -> bytes:
        return bytes(self.partials.pop(message_id, b""))


class MemoryChannel:
    """One end of an in-memory ByteChannel pair; ``cut()`` breaks both ends like a dead socket."""

    def __init__(self, peer_party: str | None, description: str) -> None:
        self._peer_party = peer_party
        self._description = description
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.other: MemoryChannel | None = None
        self.closed = False
        self.bytes_sent = 0

    @property
    def peer_party(self) -> str | None:
        return self._peer_party

    @property
    def description(self) -> str:
        return self._description

    async def send(self, data: bytes | memoryview) -> None:
        if self.closed or self.other is None or self.other.closed:
            raise ConnectionResetError("memory channel closed")
        self.bytes_sent += len(data)
        self.other._inbox.put_nowait(bytes(data))
        await asyncio.sleep(0)

    async def receive(self) -> bytes:
        if self.closed:
            return b""
        return await self._inbox.get()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._inbox.put_nowait(b"")
            if self.other is not None and not self.other.closed:
                await self.other.aclose()

    def cut(self) -> None:
        """Close both ends at once (an abrupt connection loss)."""
        for end in (self, self.other):
            if end is not None and not end.closed:
                end.closed = True
                end._inbox.put_nowait(b"")


def memory_channel_pair(party_a: str | None, party_b: str | None) -> tuple[MemoryChannel, MemoryChannel]:
    """Two joined channels; ``a.peer_party`` is ``party_b`` and vice versa."""
    a = MemoryChannel(party_b, f"memory to {party_b}")
    b = MemoryChannel(party_a, f"memory from {party_a}")
    a.other, b.other = b, a
    return a, b


class _MemoryServer:
    def __init__(self, carrier: MemoryCarrier, port: int) -> None:
        self._carrier, self._port = carrier, port

    @property
    def port(self) -> int:
        return self._port

    async def aclose(self) -> None:
        self._carrier.servers.pop(self._port, None)


class MemoryCarrier:
    """A carrier inside one event loop; ``party`` is the identity each end presents."""

    def __init__(self, *, client_party: str | None, server_party: str | None) -> None:
        self.client_party, self.server_party = client_party, server_party
        self.servers: dict[int, ChannelHandler] = {}
        self.channels: list[MemoryChannel] = []
        self.refuse = False
        """Refuse connections (a peer that is down)."""
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return "memory"

    async def connect(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None, timeout: float,
        lane: int = 0,
    ) -> ByteChannel:
        handler = self.servers.get(port)
        if handler is None or self.refuse:
            raise PeerUnavailableError(f"memory {host}:{port}: connection refused")
        a, b = memory_channel_pair(self.client_party, self.server_party)
        self.channels += [a, b]
        async def serve() -> None:
            await handler(b)

        task = asyncio.get_running_loop().create_task(serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return a

    async def listen(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, handler: ChannelHandler
    ) -> _MemoryServer:
        self.servers[port] = handler
        return _MemoryServer(self, port)

    def cut_all(self) -> None:
        for ch in self.channels:
            ch.cut()
        self.channels.clear()
