"""The asyncio driver of one link connection: a core, a ByteChannel, three tasks.

Rules of this module:

1. The driver does exactly three things (STYLE §2): stamp input with ``loop.time()``, hand the
   core's events to the owner's handler in order, and transmit (``data_to_send``, then re-arm the
   timer). It knows nothing about outboxes or inboxes.
2. One reader, one writer, one timer task, plus the owner's tasks, all in one ``asyncio.TaskGroup``.
   Anyone who changes the core calls :meth:`LinkConnection.kick` so the writer flushes.
3. The connection ends when the core reports :class:`ConnectionTerminated` or the channel fails;
   then the writer flushes the last frames (the CLOSE), closes the channel and every task stops. A
   writer stuck on a full send buffer (the peer is gone) is cancelled instead: a dead peer must
   never keep a connection, and so its reconnect, waiting.
   :attr:`LinkConnection.terminated` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from fedgate.errors import FedgateError, LocalError
from fedgate.proxy.carrier import ByteChannel
from fedgate.proxy.link_core import LinkCore
from fedgate.proxy.link_events import ConnectionTerminated, LinkEvent

__all__ = ["LinkConnection"]

log = logging.getLogger("fedgate.link")

K_TIMER_GRANULARITY = 0.5  # seconds; the timer task re-reads get_timer() at least this often
K_CLOSE_FLUSH_TIMEOUT = 2.0  # seconds to write the final CLOSE before giving up on the channel
K_DEAD_PEER_CODES = frozenset({"timeout", "io_error", "eof"})  # endings after which no CLOSE is sent

EventHandler = Callable[[LinkEvent], Awaitable[None]]
CoreT = TypeVar("CoreT", bound=LinkCore)


class LinkConnection(Generic[CoreT]):
    """Runs ``core`` over ``channel`` until the connection ends; ``handler`` sees every event."""

    def __init__(self, core: CoreT, channel: ByteChannel, handler: EventHandler) -> None:
        self.core = core
        self.channel = channel
        self.terminated: ConnectionTerminated | None = None
        self._handler = handler
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._tasks: list[asyncio.Task[Any]] = []
        self._group: asyncio.TaskGroup | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._flushing = False
        """The writer is inside a normal flush (it may wait on a full send buffer)."""

    def now(self) -> float:
        return self._loop.time()

    def kick(self) -> None:
        """The core has something to send (or the connection ended): wake the writer."""
        self._wake.set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run an owner's task for the life of this connection (cancelled when it ends)."""
        assert self._group is not None, "spawn() needs a running connection"
        if self.terminated is not None:
            coro.close()
            return
        task = self._group.create_task(self._guard(coro))
        self._tasks.append(task)

        def done(finished: asyncio.Task[None]) -> None:
            with contextlib.suppress(ValueError):
                self._tasks.remove(finished)
            coro.close()  # a task cancelled before it ran leaves ``coro`` unstarted ("never awaited")

        task.add_done_callback(done)

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except Exception as exc:  # an owner's bug or store failure ends this connection, not the gateway
            log.exception("link %s: task failed", self.channel.description)
            error = exc if isinstance(exc, FedgateError) else LocalError(f"link task failed: {exc!r}")
            event = self.core.abort(error)
            self.finish(event or ConnectionTerminated("internal_error", repr(exc), by_peer=False, error=error))

    def finish(self, event: ConnectionTerminated) -> None:
        """End the connection (first reason wins); the writer flushes and closes the channel."""
        if self.terminated is None:
            self.terminated = event
            for task in list(self._tasks):
                task.cancel()
            if self._flushing and self._writer_task is not None:
                # Blocked on a full send buffer (a dead peer): the CLOSE could not get out anyway.
                self._writer_task.cancel()
            self.kick()

    async def run(self, *owner_tasks: Coroutine[Any, Any, None]) -> ConnectionTerminated:
        """Drive the connection to its end and return why it ended."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self.kick()  # the core's HELLO is waiting
                self._writer_task = group.create_task(self._writer())
                for coro in (self._reader(), self._timer(), *owner_tasks):
                    self.spawn(coro)
        finally:
            self._group = None
            with contextlib.suppress(Exception):
                await self.channel.aclose()
        assert self.terminated is not None
        return self.terminated

    async def _dispatch(self, events: list[LinkEvent]) -> None:
        for event in events:
            await self._handler(event)
            if isinstance(event, ConnectionTerminated):
                self.finish(event)
        self.kick()

    async def _reader(self) -> None:
        while self.terminated is None:
            try:
                data = await self.channel.receive()
            except Exception as exc:  # OSError, a carrier's FedgateError, anything: it ends this link only
                self.finish(ConnectionTerminated("io_error", f"receive failed: {exc!r}", by_peer=True))
                return
            events = self.core.receive_data(data, now=self.now())
            while events:
                await self._dispatch(events)
                events = self.core.next_events(now=self.now())
            self.kick()  # frames without events (CREDIT, RESUME, PROGRESS) change what can be sent

    async def _timer(self) -> None:
        while self.terminated is None:
            deadline = self.core.get_timer()
            delay = K_TIMER_GRANULARITY if deadline is None else deadline - self.now()
            await asyncio.sleep(min(max(delay, 0.0), K_TIMER_GRANULARITY))
            await self._dispatch(self.core.handle_timer(now=self.now()))

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ending = self.terminated is not None
            if ending and self.terminated is not None and self.terminated.code in K_DEAD_PEER_CODES:
                break  # nobody is listening: a CLOSE would only wait on a full buffer
            try:
                if ending:
                    async with asyncio.timeout(K_CLOSE_FLUSH_TIMEOUT):
                        await self._flush()
                else:
                    self._flushing = True
                    try:
                        await self._flush()
                    finally:
                        self._flushing = False
            except Exception as exc:  # a dead channel: nothing more can be written
                self.finish(ConnectionTerminated("io_error", f"send failed: {exc!r}", by_peer=True))
                ending = True
            if ending:
                break
            # Not ending: if the connection ended during this flush, finish() set the event again and
            # the next round sends the CLOSE.
        with contextlib.suppress(Exception):
            await self.channel.aclose()

    async def _flush(self) -> None:
        for data in self.core.data_to_send():
            await self.channel.send(data)
