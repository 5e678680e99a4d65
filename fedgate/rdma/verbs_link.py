"""The ``rdma`` carrier on pyverbs: RC queue pairs driven from the asyncio loop.

Rules of this module:

1. The only pyverbs importer of fedgate; imported only when a route selects ``rdma`` (the registry
   names it by import string). Works with Debian's python3-pyverbs 44 and newer: enums come from
   ``pyverbs.libibverbs_enums`` or ``pyverbs.enums``; the completion channel's fd is
   ``CompChannel.fd`` (v57+) or found by diffing ``/proc/self/fd`` (v44); the ``logging.basicConfig``
   pyverbs runs on import is undone.
2. Thin adapter (STYLE §2): protocol decisions live in :mod:`._session`; the per-channel adapter
   (:mod:`._channel`) executes them; this file opens the device, polls the CQ, connects QPs and
   runs the control connection. It hands pyverbs to the channels as one :class:`Verbs` namespace.
3. One :class:`VerbsDevice` per carrier: device context, PD, one completion channel and one CQ shared
   by every channel, its fd registered with ``loop.add_reader``; on readiness: get the event, ack,
   re-arm, then poll until empty (no completion is lost between re-arm and poll).
4. Connection setup uses a TCP (optionally TLS) control connection: exchange :class:`~._wire.Hello`
   (QP number, PSN, GID, LID, MTU, slots), bring the RC QP to RTS, then a READY barrier so neither
   side sends before the other has posted its receives. rdma_cm stays out of the asyncio process.
   The control connection stays open: EOF on it without a BYE means the peer is gone.
5. A peer that disappears is detected three ways (see :mod:`._channel`), each failing the channel
   with PeerUnavailableError: the control connection drops, a work completion fails (retry
   exceeded), or a posted SEND/READ does not complete within ``completion_timeout_s``.
6. The CQ is shared: a channel is refused (LocalError) when the CQ could overflow with one more.
7. Teardown is explicit and ordered (pyverbs' finalizers at exit run in the wrong order): a channel
   destroys its QP, then its MRs; the device closes the CQ, the completion channel, the pool's
   MRs, the PD, then the context.
8. Foreign exceptions (pyverbs, OS, TLS) become fedgate errors here, with ``raise ... from exc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import logging
import os
import secrets
import ssl
from typing import Any

from fedgate.errors import FedgateError, LocalError, PeerUnavailableError, RemoteProtocolError
from fedgate.proxy.carrier import ByteChannel, ChannelHandler
from fedgate.rdma._channel import VerbsChannel
from fedgate.rdma._pool import RegistrationPool
from fedgate.rdma._wire import K_HELLO_MAX_BYTES, Hello, decode_hello, encode_hello
from fedgate.rdma.config import RdmaConfig

__all__ = ["RdmaCarrier", "VerbsChannel", "VerbsDevice", "load_pyverbs"]

log = logging.getLogger("fedgate.rdma")

K_CQ_ENTRIES = 16384  # completions; clamped to the device's max_cqe
K_POLL_BATCH = 64  # completions per ibv_poll_cq call
K_READY = b"READY\n"
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
            self.cq_size = min(K_CQ_ENTRIES, attr.max_cqe)
            self.cq = v.cq.CQ(self.ctx, self.cq_size, None, self.comp_channel, 0)
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


def _peer_party(writer: asyncio.StreamWriter, tls: ssl.SSLContext | None, where: str) -> str | None:
    """The party in the peer certificate's SAN URI (``fedgate:party:<id>``), as the tcp carrier does."""
    if tls is None:
        return None
    from fedgate.proxy.certs import party_from_peercert  # cryptography loads only for TLS links

    party = party_from_peercert(writer.get_extra_info("peercert"))
    if party is None:
        raise PeerUnavailableError(f"{where}: the peer's certificate names no party (SAN URI fedgate:party:<id>)")
    return party


class RdmaServer:
    """A listening rdma carrier; ``aclose`` stops accepting and closes the channels it accepted."""

    def __init__(self, server: asyncio.Server, channels: set[VerbsChannel]) -> None:
        self._server = server
        self._channels = channels

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        self._server.close()
        channels, self._channels = list(self._channels), set()
        for channel in channels:
            await channel.aclose()
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
        self, host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None, timeout: float,
        lane: int = 0,
    ) -> ByteChannel:
        where = f"rdma {host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=server_hostname if tls else None, limit=K_HELLO_MAX_BYTES
                )
                return await self._handshake(reader, writer, where, tls)
        except TimeoutError as exc:
            raise PeerUnavailableError(f"{where}: no connection within {timeout:.1f} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise PeerUnavailableError(f"{where}: {exc}") from exc

    async def listen(self, host: str, port: int, *, tls: ssl.SSLContext | None, handler: ChannelHandler) -> RdmaServer:
        self.device()  # fail at listen time, not at the first peer, when there is no device
        accepted_channels: set[VerbsChannel] = set()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")
            where = f"rdma {peer[0]}:{peer[1]}" if peer else "rdma peer"
            try:
                async with asyncio.timeout(self._config.close_timeout_s * 2):
                    channel = await self._handshake(reader, writer, where, tls)
            except (FedgateError, OSError, ssl.SSLError, TimeoutError) as exc:
                log.warning("%s: handshake failed: %s", where, exc)
                writer.close()
                return
            accepted_channels.add(channel)
            try:
                await handler(channel)
            except FedgateError as exc:  # the handler's channel failed or was closed under it
                log.info("%s: %s", where, exc)
            finally:
                accepted_channels.discard(channel)
                await channel.aclose()

        server = await asyncio.start_server(accepted, host, port, ssl=tls, limit=K_HELLO_MAX_BYTES)
        return RdmaServer(server, accepted_channels)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str, tls: ssl.SSLContext | None
    ) -> VerbsChannel:
        dev = self.device()
        cfg = self._config
        per_channel = 2 * cfg.recv_slots + dev.rd_atomic + 1  # completions one channel can have queued
        if (len(dev.channels) + 1) * per_channel > dev.cq_size:
            writer.close()
            raise LocalError(f"{where}: the shared CQ ({dev.cq_size} entries) has no room for another channel")
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
                description=f"{where} qp {local.qpn}->{peer.qpn}", peer_party=_peer_party(writer, tls, where),
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
