"""One RDMA channel: an RC queue pair to a peer gateway, as a ByteChannel.

Rules of this module:

1. Thin adapter (STYLE §2) over :class:`~._session.RdmaSession`: completions come in through
   :meth:`VerbsChannel.on_completion` (called by the device's CQ poller), the session's actions go
   out through :meth:`VerbsChannel.pump`, which stamps them with ``loop.time()``, posts them and then
   wakes the application's waiters. Protocol decisions stay in the session.
2. pyverbs is reached only through the :class:`~.verbs_link.Verbs` namespace the device hands over;
   this module imports no pyverbs module itself (verbs_link is the only importer).
3. Payloads are copied once each way: into a send slot or pool buffer with a memoryview slice
   assignment, out of a receive slot or pool buffer with ``ctypes.string_at`` (one memcpy).
4. A channel fails (PeerUnavailableError) on a failed work completion, on a posted SEND/READ older
   than ``completion_timeout_s``, or when its control connection drops without a BYE.
5. :meth:`VerbsChannel.teardown` destroys the QP before the MRs and wakes every waiter; idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedgate.errors import FedgateError, PeerUnavailableError, RemoteProtocolError
from fedgate.rdma._session import (
    EagerMessage,
    EndOfStream,
    PostRead,
    PostRecv,
    PostSend,
    RdmaSession,
    ReleaseSource,
    SessionState,
    eager_limit,
)
from fedgate.rdma._wire import K_HEADER_BYTES, K_RTS_BYTES, Hello

if TYPE_CHECKING:
    from fedgate.rdma.verbs_link import VerbsDevice

__all__ = ["K_BYE", "VerbsChannel", "mem_view"]

log = logging.getLogger("fedgate.rdma")

K_STALL_CHECK_S = 0.5  # seconds between stall checks of a channel
K_BYE = b"BYE\n"
K_WR_RECV, K_WR_SEND, K_WR_READ = 0, 1, 2  # low 2 bits of a wr_id


def mem_view(addr: int, length: int) -> memoryview:
    """A writable byte view of registered memory at ``addr``."""
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


class VerbsChannel:
    """One RC queue pair to a peer gateway, as a ByteChannel; messages keep their boundaries."""

    def __init__(
        self,
        device: VerbsDevice,
        qp: Any,
        *,
        local: Hello,
        peer: Hello,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        description: str,
        peer_party: str | None,
    ) -> None:
        cfg = device.config
        self._dev = device
        self._v = device.v
        self._qp = qp
        self._cfg = cfg
        self._reader, self._writer = reader, writer
        self._description = description
        self._peer_party = peer_party
        self._slot = cfg.slot_bytes
        self._recv_mr = device.make_mr(cfg.recv_slots * self._slot)
        self._send_mr = device.make_mr(cfg.recv_slots * self._slot)
        self._recv_mem = mem_view(self._recv_mr.buf, cfg.recv_slots * self._slot)
        self._send_mem = mem_view(self._send_mr.buf, cfg.recv_slots * self._slot)
        self.session = RdmaSession(
            recv_slots=cfg.recv_slots,
            send_slots=cfg.recv_slots,
            peer_recv_slots=peer.recv_slots,
            max_eager=eager_limit(peer_slot_bytes=peer.slot_bytes, send_slot_bytes=self._slot),
            chunk_bytes=cfg.read_chunk_bytes,
            max_reads=min(local.rd_atomic, peer.rd_atomic),
            max_rendezvous=cfg.max_rendezvous,
        )
        self._payloads: dict[int, bytes] = {}
        self._sources: dict[int, Any] = {}  # token -> pool MR announced to the peer
        self._sinks: dict[int, Any] = {}  # transfer ident -> pool MR being read into
        self._reads: dict[int, tuple[int, int]] = {}  # wr_id -> (ident, offset)
        self._next_token = 1
        self._next_read = 0
        self._error: FedgateError | None = None
        self._peer_bye = False
        self._closed = False
        self._torn_down = False
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        device.channels[qp.qp_num] = self
        self.pump()  # posts every receive slot before the READY barrier

    # --- ByteChannel --------------------------------------------------------------------------

    @property
    def peer_party(self) -> str | None:
        return self._peer_party

    @property
    def description(self) -> str:
        return self._description

    async def send(self, data: bytes | memoryview) -> None:
        length = len(data) if isinstance(data, bytes) else data.nbytes
        self._check_usable()
        if length == 0:
            return
        session = self.session
        limit = self._cfg.recv_slots
        if length <= session.max_eager:
            await self._wait(lambda: session.queued < limit)
            token = self._token()
            self._payloads[token] = data if isinstance(data, bytes) else bytes(data)
            session.queue_eager(token, length)
        else:
            await self._wait(lambda: session.queued < limit and session.can_start_rendezvous())
            mr, _cap = self._dev.pool.get(length)
            mem_view(mr.buf, length)[:] = memoryview(data).cast("B")
            token = self._token()
            self._sources[token] = mr
            session.queue_rendezvous(token, length, addr=mr.buf, rkey=mr.rkey)
        self.pump()

    async def receive(self) -> bytes:
        while True:
            delivery = self.session.next_delivery()
            if delivery is not None:
                if isinstance(delivery, EndOfStream):
                    return b""
                if self._torn_down:  # its memory is deregistered: never touch it
                    raise self._error or PeerUnavailableError(f"{self._description}: channel closed")
                if isinstance(delivery, EagerMessage):
                    offset = delivery.slot * self._slot + K_HEADER_BYTES
                    data = ctypes.string_at(self._recv_mr.buf + offset, delivery.length)
                else:
                    mr = self._sinks.pop(delivery.ident)
                    data = ctypes.string_at(mr.buf, delivery.length)
                    self._dev.pool.put(mr)
                self.session.consumed(delivery)
                self.pump()
                return data
            if self._error is not None:
                raise self._error
            if self._closed:
                raise PeerUnavailableError(f"{self._description}: channel closed")
            self._changed.clear()
            await self._changed.wait()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        session = self.session
        if self._error is None and not self._peer_bye and not self._torn_down:
            try:
                async with asyncio.timeout(self._cfg.close_timeout_s):
                    if session.state is SessionState.OPEN:
                        session.queue_close()
                        self.pump()
                    await self._wait(
                        lambda: (session.state is SessionState.CLOSED and session.idle()) or self._peer_bye,
                        closing=True,
                    )
            except TimeoutError:
                log.warning("rdma %s: close did not drain in %.1f s", self._description, self._cfg.close_timeout_s)
            except FedgateError:
                pass
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(K_BYE)
                await asyncio.wait_for(self._writer.drain(), 1.0)
        self.teardown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)

    # --- driving ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching the control connection and the completion deadlines."""
        self._tasks.append(asyncio.create_task(self._watch_control()))
        self._tasks.append(asyncio.create_task(self._watch_stalls()))

    def on_completion(self, wc: Any) -> None:
        kind, index = wc.wr_id & 3, wc.wr_id >> 2
        if wc.status != self._v.e.IBV_WC_SUCCESS:
            if not self._torn_down:
                self.fail(PeerUnavailableError(f"{self._description}: work completion failed (status {wc.status})"))
            return
        if self._error is not None:
            return
        try:
            if kind == K_WR_RECV:
                offset = index * self._slot
                head = bytes(self._recv_mem[offset : offset + K_RTS_BYTES])
                self.session.on_recv(index, head, wc.byte_len)
            elif kind == K_WR_SEND:
                self.session.on_send_complete(index)
            else:
                ident, offset = self._reads.pop(index)
                self.session.on_read_complete(ident, offset)
        except RemoteProtocolError as exc:
            self.fail(exc)

    def pump(self) -> None:
        """Execute the session's actions, then wake the waiters."""
        if self._torn_down:
            return
        try:
            for action in self.session.actions(now=self._dev.loop.time()):
                if isinstance(action, PostRecv):
                    self._post_recv(action.slot)
                elif isinstance(action, PostSend):
                    self._post_send(action)
                elif isinstance(action, PostRead):
                    self._post_read(action)
                elif isinstance(action, ReleaseSource):
                    self._dev.pool.put(self._sources.pop(action.token))
        except self._v.PyverbsError as exc:
            self.fail(PeerUnavailableError(f"{self._description}: posting failed: {exc}"))
        self._changed.set()

    def _post_recv(self, slot: int) -> None:
        w = self._v.wr
        sge = w.SGE(self._recv_mr.buf + slot * self._slot, self._slot, self._recv_mr.lkey)
        self._qp.post_recv(w.RecvWR(wr_id=(slot << 2) | K_WR_RECV, num_sge=1, sg=[sge]))

    def _post_send(self, action: PostSend) -> None:
        offset = action.slot * self._slot
        header = action.header
        end = offset + len(header)
        self._send_mem[offset:end] = header
        if action.token is not None:
            payload = self._payloads.pop(action.token)
            self._send_mem[end : end + len(payload)] = payload
            end += len(payload)
        w = self._v.wr
        sge = w.SGE(self._send_mr.buf + offset, end - offset, self._send_mr.lkey)
        wr = w.SendWR(wr_id=(action.slot << 2) | K_WR_SEND, opcode=self._v.e.IBV_WR_SEND, num_sge=1, sg=[sge])
        self._qp.post_send(wr)

    def _post_read(self, action: PostRead) -> None:
        chunk = action.chunk
        if chunk.offset == 0:
            self._sinks[chunk.ident] = self._dev.pool.get(chunk.total)[0]
        sink = self._sinks[chunk.ident]
        self._next_read += 1
        self._reads[self._next_read] = (chunk.ident, chunk.offset)
        w = self._v.wr
        sge = w.SGE(sink.buf + chunk.offset, chunk.length, sink.lkey)
        wr = w.SendWR(wr_id=(self._next_read << 2) | K_WR_READ, opcode=self._v.e.IBV_WR_RDMA_READ, num_sge=1, sg=[sge])
        wr.set_wr_rdma(chunk.rkey, chunk.remote_addr)
        self._qp.post_send(wr)

    def fail(self, error: FedgateError) -> None:
        if self._error is None:
            self._error = error
            self.session.fail()
            log.warning("%s", error)
        self._changed.set()

    def _check_usable(self, *, closing: bool = False) -> None:
        if self._error is not None:
            raise self._error
        if (self._closed and not closing) or self._torn_down:
            raise PeerUnavailableError(f"{self._description}: channel closed")

    async def _wait(self, ready: Callable[[], bool], *, closing: bool = False) -> None:
        while True:
            self._check_usable(closing=closing)
            if ready():
                return
            self._changed.clear()
            await self._changed.wait()

    async def _watch_control(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if line == K_BYE:
                    self._peer_bye = True
                    self._dev.poll_now()  # its CLOSE completed before its BYE: take it in first
                    self._changed.set()
                    continue
                if not line:
                    break
                self.fail(RemoteProtocolError(f"{self._description}: unexpected control line {line[:40]!r}"))
                return
        except (OSError, ssl.SSLError, ValueError):
            pass
        self._dev.poll_now()
        if not self._peer_bye and not self.session.peer_closed:
            self.fail(PeerUnavailableError(f"{self._description}: control connection lost; the peer is gone"))
        self._peer_bye = True
        self._changed.set()

    async def _watch_stalls(self) -> None:
        timeout = self._cfg.completion_timeout_s
        while self._error is None:
            await asyncio.sleep(min(K_STALL_CHECK_S, timeout / 4))
            oldest = self.session.oldest_posted()
            if oldest is not None and self._dev.loop.time() - oldest > timeout:
                self.fail(
                    PeerUnavailableError(f"{self._description}: no completion for {timeout:.1f} s; the peer is gone")
                )

    def teardown(self) -> None:
        """Destroy the QP, then the MRs; wake every waiter. Idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        self._closed = True
        current = asyncio.current_task() if self._dev.loop.is_running() else None
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._dev.channels.pop(self._qp.qp_num, None)
        with contextlib.suppress(Exception):
            self._qp.close()
        for mr in (*self._sources.values(), *self._sinks.values()):
            self._dev.pool.put(mr)
        self._sources.clear()
        self._sinks.clear()
        self._recv_mem.release()
        self._send_mem.release()
        for mr in (self._recv_mr, self._send_mr):
            with contextlib.suppress(Exception):
                mr.close()
        with contextlib.suppress(Exception):
            self._writer.close()
        if self._error is None:
            self._error = PeerUnavailableError(f"{self._description}: channel closed")
        self._changed.set()

    @property
    def torn_down(self) -> bool:
        return self._torn_down

    def _token(self) -> int:
        self._next_token += 1
        return self._next_token
