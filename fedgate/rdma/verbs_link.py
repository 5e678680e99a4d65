"""The ``rdma`` carrier on pyverbs: RC queue pairs driven from the asyncio loop.

Rules of this module:

1. The only pyverbs importer of fedgate; imported only when a route selects ``rdma`` (the registry
   names it by import string). Works with Debian's python3-pyverbs 44 and newer: enums come from
   ``pyverbs.libibverbs_enums`` or ``pyverbs.enums``; the completion channel's fd is
   ``CompChannel.fd`` (v57+) or found by diffing ``/proc/self/fd`` (v44); the ``logging.basicConfig``
   pyverbs runs on import is undone.
2. Thin adapter (STYLE §2): protocol decisions live in :mod:`._session`; this file stamps
   completions with ``loop.time()``, executes the session's actions (post SEND / RECV / READ, copy
   payloads in and out of registered memory) and wakes the application's waiters.
3. One :class:`VerbsDevice` per carrier: device context, PD, one completion channel and one CQ shared
   by every channel, its fd registered with ``loop.add_reader``; on readiness: get the event, ack,
   re-arm, then poll until empty (no completion is lost between re-arm and poll).
4. Connection setup uses a TCP (optionally TLS) control connection: exchange :class:`~._wire.Hello`
   (QP number, PSN, GID, LID, MTU, slots), bring the RC QP to RTS, then a READY barrier so neither
   side sends before the other has posted its receives. rdma_cm stays out of the asyncio process.
   The control connection stays open: EOF on it without a BYE means the peer is gone.
5. A peer that disappears is detected three ways, each failing the channel with
   PeerUnavailableError: the control connection drops, a work completion fails (retry exceeded),
   or a posted SEND/READ does not complete within ``completion_timeout_s``.
6. Teardown is explicit and ordered (pyverbs' finalizers at exit run in the wrong order): a channel
   destroys its QP, then its MRs; the device closes the CQ, the completion channel, the pool's
   MRs, the PD, then the context.
7. Foreign exceptions (pyverbs, OS, TLS) become fedgate errors here, with ``raise ... from exc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import importlib
import logging
import os
import secrets
import ssl
from collections.abc import Callable
from typing import Any

from fedgate.errors import FedgateError, LocalError, PeerUnavailableError, RemoteProtocolError
from fedgate.proxy.carrier import ByteChannel, ChannelHandler
from fedgate.rdma._pool import RegistrationPool
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
from fedgate.rdma._wire import K_HEADER_BYTES, K_HELLO_MAX_BYTES, K_RTS_BYTES, Hello, decode_hello, encode_hello
from fedgate.rdma.config import RdmaConfig

__all__ = ["RdmaCarrier", "VerbsChannel", "VerbsDevice", "load_pyverbs"]

log = logging.getLogger("fedgate.rdma")

K_CQ_ENTRIES = 16384  # completions; clamped to the device's max_cqe
K_POLL_BATCH = 64  # completions per ibv_poll_cq call
K_STALL_CHECK_S = 0.5  # seconds between stall checks of a channel
K_READY = b"READY\n"
K_BYE = b"BYE\n"
K_WR_RECV, K_WR_SEND, K_WR_READ = 0, 1, 2  # low 2 bits of a wr_id
K_PORT_ACTIVE = 4  # ibv_port_state IBV_PORT_ACTIVE
K_LINK_LAYER_IB = 1  # IBV_LINK_LAYER_INFINIBAND


class Verbs:
    """The pyverbs modules and enums in use (one version-independent namespace)."""

    def __init__(self) -> None:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            self.device = importlib.import_module("pyverbs.device")
            self.pd = importlib.import_module("pyverbs.pd")
            self.cq = importlib.import_module("pyverbs.cq")
            self.mr = importlib.import_module("pyverbs.mr")
            self.qp = importlib.import_module("pyverbs.qp")
            self.wr = importlib.import_module("pyverbs.wr")
            self.addr = importlib.import_module("pyverbs.addr")
            self.error = importlib.import_module("pyverbs.pyverbs_error")
            try:
                self.e = importlib.import_module("pyverbs.libibverbs_enums")
            except ImportError:
                self.e = importlib.import_module("pyverbs.enums")
        finally:  # pyverbs calls logging.basicConfig on import; leave the process's logging alone
            for handler in list(root.handlers):
                if handler not in handlers:
                    root.removeHandler(handler)
            root.setLevel(level)
        self.PyverbsError: type[Exception] = self.error.PyverbsError


def load_pyverbs() -> Verbs:
    """Import pyverbs; LocalError saying why when it is not installed."""
    try:
        return Verbs()
    except ImportError as exc:
        raise LocalError(f"pyverbs is not importable ({exc}); install python3-pyverbs") from exc


def _event_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "infinibandevent" in os.readlink(f"/proc/self/fd/{name}"):
                out.add(int(name))
    return out


def _mem(addr: int, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


class VerbsDevice:
    """A device context shared by a carrier's channels: PD, CQ, completion channel, buffer pool."""

    def __init__(self, config: RdmaConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.v = v = load_pyverbs()
        self.config = config
        self.loop = loop
        self.channels: dict[int, VerbsChannel] = {}
        try:
            names = [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in v.device.get_device_list()]
        except v.PyverbsError as exc:
            raise LocalError(f"no RDMA device: {exc}") from exc
        if not names or (config.device and config.device not in names):
            raise LocalError(f"RDMA device {config.device or '(any)'} not found; present: {names}")
        self.name = config.device or names[0]
        try:
            self.ctx = v.device.Context(name=self.name)
            self.port = self.ctx.query_port(config.port_num)
            if self.port.state != K_PORT_ACTIVE:
                raise LocalError(f"{self.name} port {config.port_num} is not active (state {self.port.state})")
            attr = self.ctx.query_device()
            self.rd_atomic = max(1, min(config.max_reads, attr.max_qp_rd_atom, attr.max_qp_init_rd_atom))
            self.gid_index = self._pick_gid()
            self.gid = str(self.ctx.query_gid(config.port_num, self.gid_index).gid)
            self.pd = v.pd.PD(self.ctx)
            before = _event_fds()
            self.comp_channel = v.cq.CompChannel(self.ctx)
            fd = getattr(self.comp_channel, "fd", None)
            if fd is None:
                new = _event_fds() - before
                if len(new) != 1:
                    raise LocalError(f"cannot find the completion channel's fd (candidates {sorted(new)})")
                fd = new.pop()
            self.fd = int(fd)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            self.cq = v.cq.CQ(self.ctx, min(K_CQ_ENTRIES, attr.max_cqe), None, self.comp_channel, 0)
            self.cq.req_notify()
        except v.PyverbsError as exc:
            raise LocalError(f"cannot open RDMA device {self.name}: {exc}") from exc
        access = v.e.IBV_ACCESS_LOCAL_WRITE | v.e.IBV_ACCESS_REMOTE_READ
        self.pool: RegistrationPool[Any] = RegistrationPool(
            lambda size: v.mr.MR(self.pd, size, access),
            lambda mr: mr.close(),
            min_bytes=config.read_chunk_bytes,
            max_cached_bytes=config.pool_cache_bytes,
        )
        self.closed = False
        loop.add_reader(self.fd, self._on_readable)

    def _pick_gid(self) -> int:
        if self.config.gid_index >= 0:
            return self.config.gid_index
        gids: list[tuple[int, str]] = []
        for index in range(min(self.port.gid_tbl_len, 16)):
            with contextlib.suppress(self.v.PyverbsError):
                gid = str(self.ctx.query_gid(self.config.port_num, index).gid)
                if gid.replace("0", "").replace(":", ""):
                    gids.append((index, gid))
        for index, gid in gids:  # RoCE v2 over IPv4 routes across subnets: prefer it
            if gid.startswith("0000:0000:0000:0000:0000:ffff:"):
                return index
        if not gids:
            raise LocalError(f"{self.name} port {self.config.port_num} has no GID")
        return gids[0][0]

    def make_mr(self, size: int) -> Any:
        return self.v.mr.MR(self.pd, size, self.v.e.IBV_ACCESS_LOCAL_WRITE)

    def create_qp(self, *, send_wr: int, recv_wr: int) -> Any:
        v = self.v
        cap = v.qp.QPCap(max_send_wr=send_wr, max_recv_wr=recv_wr, max_send_sge=1, max_recv_sge=1)
        init = v.qp.QPInitAttr(qp_type=v.e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=1)
        attr = v.qp.QPAttr()
        attr.qp_access_flags = v.e.IBV_ACCESS_LOCAL_WRITE | v.e.IBV_ACCESS_REMOTE_READ
        attr.port_num = self.config.port_num
        return v.qp.QP(self.pd, init, attr)

    def connect_qp(self, qp: Any, *, local: Hello, peer: Hello) -> None:
        """INIT -> RTR -> RTS towards ``peer``."""
        v = self.v
        attr = v.qp.QPAttr()
        attr.path_mtu = min(local.mtu, peer.mtu)
        attr.dest_qp_num = peer.qpn
        attr.rq_psn = peer.psn
        attr.sq_psn = local.psn
        attr.max_dest_rd_atomic = local.rd_atomic
        attr.max_rd_atomic = min(local.rd_atomic, peer.rd_atomic)
        attr.min_rnr_timer = 12
        attr.timeout = self.config.retry_timeout
        attr.retry_cnt = self.config.retry_count
        attr.rnr_retry = 7  # credits make RNR impossible; 7 means retry for ever, never fail on it
        if self.port.link_layer == K_LINK_LAYER_IB and peer.lid:
            attr.ah_attr = v.addr.AHAttr(dlid=peer.lid, port_num=self.config.port_num)
        else:
            route = v.addr.GlobalRoute(dgid=v.addr.GID(peer.gid), sgid_index=self.gid_index)
            attr.ah_attr = v.addr.AHAttr(gr=route, is_global=1, port_num=self.config.port_num)
        qp.to_rts(attr)

    def _on_readable(self) -> None:
        try:
            self.comp_channel.get_cq_event(self.cq)
            self.cq.ack_events(1)
        except self.v.PyverbsError:
            pass  # EAGAIN: a spurious wake-up; poll anyway
        touched: dict[int, VerbsChannel] = {}
        try:
            self.cq.req_notify()
            while True:
                count, wcs = self.cq.poll(K_POLL_BATCH)
                for wc in wcs:
                    channel = self.channels.get(wc.qp_num)
                    if channel is not None:
                        channel.on_completion(wc)
                        touched[wc.qp_num] = channel
                if count < K_POLL_BATCH:
                    break
        except self.v.PyverbsError as exc:
            log.error("rdma: polling the CQ of %s failed: %s", self.name, exc)
            for channel in list(self.channels.values()):
                channel.fail(LocalError(f"CQ poll failed: {exc}"))
        for channel in touched.values():
            channel.pump()

    def poll_now(self) -> None:
        """Drain the CQ outside an event (before judging a lost control connection)."""
        if not self.closed:
            self._on_readable()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        for channel in list(self.channels.values()):
            channel.teardown()
        self.pool.close()
        for obj in (self.cq, self.comp_channel, self.pd, self.ctx):
            with contextlib.suppress(Exception):
                obj.close()


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
        self._recv_mem = _mem(self._recv_mr.buf, cfg.recv_slots * self._slot)
        self._send_mem = _mem(self._send_mr.buf, cfg.recv_slots * self._slot)
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
            _mem(mr.buf, length)[:] = memoryview(data).cast("B")
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


def _peer_party(writer: asyncio.StreamWriter) -> str | None:
    cert = writer.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class RdmaServer:
    def __init__(self, server: asyncio.Server, carrier: RdmaCarrier) -> None:
        self._server = server
        self._carrier = carrier

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        self._server.close()
        await self._carrier.close_channels()
        await self._server.wait_closed()


class RdmaCarrier:
    """The ``rdma`` carrier: TCP (or TLS) control connection, RC QP data path."""

    def __init__(self, config: RdmaConfig) -> None:
        self._config = config
        self._device: VerbsDevice | None = None
        self._channels: set[VerbsChannel] = set()

    @property
    def name(self) -> str:
        return "rdma"

    def device(self) -> VerbsDevice:
        if self._device is None:
            self._device = VerbsDevice(self._config, asyncio.get_running_loop())
        return self._device

    async def connect(
        self, host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None, timeout: float
    ) -> ByteChannel:
        where = f"rdma {host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=server_hostname if tls else None, limit=K_HELLO_MAX_BYTES
                )
                return await self._handshake(reader, writer, where)
        except TimeoutError as exc:
            raise PeerUnavailableError(f"{where}: no connection within {timeout:.1f} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise PeerUnavailableError(f"{where}: {exc}") from exc

    async def listen(self, host: str, port: int, *, tls: ssl.SSLContext | None, handler: ChannelHandler) -> RdmaServer:
        self.device()  # fail at listen time, not at the first peer, when there is no device

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")
            where = f"rdma {peer[0]}:{peer[1]}" if peer else "rdma peer"
            try:
                async with asyncio.timeout(self._config.close_timeout_s * 2):
                    channel = await self._handshake(reader, writer, where)
            except (FedgateError, OSError, ssl.SSLError, TimeoutError) as exc:
                log.warning("%s: handshake failed: %s", where, exc)
                writer.close()
                return
            try:
                await handler(channel)
            finally:
                await channel.aclose()

        server = await asyncio.start_server(accepted, host, port, ssl=tls, limit=K_HELLO_MAX_BYTES)
        return RdmaServer(server, self)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str) -> VerbsChannel:
        dev = self.device()
        cfg = self._config
        try:
            qp = dev.create_qp(send_wr=cfg.recv_slots + dev.rd_atomic + 1, recv_wr=cfg.recv_slots)
            local = Hello(
                qpn=qp.qp_num, psn=secrets.randbits(24), gid=dev.gid, lid=dev.port.lid, mtu=dev.port.active_mtu,
                recv_slots=cfg.recv_slots, slot_bytes=cfg.slot_bytes, rd_atomic=dev.rd_atomic,
            )  # fmt: skip
        except dev.v.PyverbsError as exc:
            writer.close()
            raise LocalError(f"{where}: cannot create a QP: {exc}") from exc
        channel: VerbsChannel | None = None
        try:
            writer.write(encode_hello(local))
            await writer.drain()
            peer = decode_hello(await _read_line(reader, where))
            channel = VerbsChannel(
                dev, qp, local=local, peer=peer, reader=reader, writer=writer,
                description=f"{where} qp {local.qpn}->{peer.qpn}", peer_party=_peer_party(writer),
            )  # fmt: skip
            dev.connect_qp(qp, local=local, peer=peer)
            writer.write(K_READY)
            await writer.drain()
            if await _read_line(reader, where) != K_READY:
                raise RemoteProtocolError(f"{where}: expected READY")
        except BaseException as exc:
            if channel is not None:
                channel.teardown()
            else:
                with contextlib.suppress(Exception):
                    qp.close()
                writer.close()
            if isinstance(exc, dev.v.PyverbsError):
                raise LocalError(f"{where}: cannot connect the QP: {exc}") from exc
            raise
        channel.start()
        self._channels = {c for c in self._channels if not c.torn_down}
        self._channels.add(channel)
        return channel

    async def close_channels(self) -> None:
        channels, self._channels = list(self._channels), set()
        for channel in channels:
            await channel.aclose()

    async def aclose(self) -> None:
        """Close every channel, then the device (explicit, ordered teardown)."""
        await self.close_channels()
        if self._device is not None:
            self._device.close()
            self._device = None


async def _read_line(reader: asyncio.StreamReader, where: str) -> bytes:
    try:
        line = await reader.readline()
    except ValueError as exc:  # longer than the reader's limit
        raise RemoteProtocolError(f"{where}: control line too long") from exc
    if not line.endswith(b"\n"):
        raise PeerUnavailableError(f"{where}: control connection closed during the handshake")
    return line
