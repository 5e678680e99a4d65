"""Plugging a fedgate controller and pacer into one aioquic connection.

Rules of this module:

1. No asyncio here: these are synchronous adapters between aioquic's recovery (which calls them with
   its own ``now``) and our sans-IO controller and pacer.
2. aioquic's registry of congestion controls is a module-level dict; we do not register anything in
   it. :func:`install` replaces the controller and the pacer of one connection before any packet is
   sent (aioquic 1.7.2: ``QuicConnection._loss._cc`` and ``._loss._pacer``; the attribute names are
   checked, and a mismatch raises instead of silently running aioquic's reno).
3. aioquic's pacer bucket holds at most 16 datagrams and paces at cwnd/srtt; ours follows the
   controller's pacing rate with a bucket of ``bucket_s`` seconds (>= 2 ms, see ``_pacer``), grown to
   ``K_BUCKET_RTT_SHARE`` of min_rtt (at most ``K_BUCKET_MAX``) on long paths. The event loop is
   sometimes late (ACK bursts, GC: a mean of 2.2 ms and up to 50 ms measured at 320 ms / 100 Mbit/s);
   tokens beyond the bucket are lost, and with a 4 ms bucket the sender put out 84 Mbit/s while
   pacing at 112. A catch-up burst of 1/16 of an RTT is small against the path's own queue.
4. Packet ids given to the controller combine the packet number space and the packet number, so the
   three QUIC spaces never collide.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aioquic.quic.congestion.base import QuicCongestionControl
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from fedgate.congestion._base import CongestionController
from fedgate.congestion._pacer import Pacer

__all__ = ["AioquicController", "AioquicPacer", "install"]

K_BUCKET_RTT_SHARE = 1 / 16  # the pacer bucket grows to this share of min_rtt...
K_BUCKET_MAX = 0.02  # ...up to this many seconds of data

_SPACE = {Epoch.INITIAL: 0, Epoch.HANDSHAKE: 1, Epoch.ZERO_RTT: 2, Epoch.ONE_RTT: 2}


def _packet_id(packet: QuicSentPacket) -> int:
    if packet.epoch is Epoch.ONE_RTT:  # nearly every packet: skip hashing the Enum (a Python-level call)
        return packet.packet_number * 4 + 2
    return packet.packet_number * 4 + _SPACE[packet.epoch]


class AioquicController(QuicCongestionControl):
    """aioquic's controller interface, answered by a fedgate controller."""

    def __init__(self, controller: CongestionController) -> None:
        super().__init__(max_datagram_size=controller.max_datagram_size)
        self.controller = controller
        self.now = 0.0
        self._sync()

    def _sync(self) -> None:
        self.bytes_in_flight = self.controller.bytes_in_flight
        self.congestion_window = self.controller.congestion_window

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        now = packet.sent_time if packet.sent_time is not None else self.now
        self.now = now
        self.controller.on_packet_sent(now=now, packet_id=_packet_id(packet), size=packet.sent_bytes)
        self._sync()

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.now = now
        self.controller.on_packet_acked(now=now, packet_id=_packet_id(packet))
        self._sync()

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        self.controller.on_packets_discarded(packet_ids=[_packet_id(p) for p in packets])
        self._sync()

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        self.now = now
        self.controller.on_packets_lost(now=now, packet_ids=[_packet_id(p) for p in packets])
        self._sync()

    def on_persistent_congestion(self) -> None:
        self.controller.on_persistent_congestion(now=self.now)
        self._sync()

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        # The controller measures RTT per acked packet itself; only the clock is taken here.
        self.now = now

    def get_log_data(self) -> dict[str, Any]:
        stats = self.controller.statistics()
        data: dict[str, Any] = {
            "cwnd": stats.congestion_window,
            "bytes_in_flight": stats.bytes_in_flight,
            "cc_state": stats.state,
        }
        if stats.pacing_rate is not None:
            data["pacing_rate"] = int(stats.pacing_rate * 8)  # bits per second, as qlog has it
        if stats.bandwidth_estimate is not None:
            data["bandwidth_estimate"] = int(stats.bandwidth_estimate * 8)
        return data


class AioquicPacer:
    """aioquic's pacer interface (``next_send_time``, ``update_after_send``, ``update_rate``)."""

    def __init__(self, controller: CongestionController, pacer: Pacer, *, bucket_s: float) -> None:
        self._controller = controller
        self._pacer = pacer
        self._size = controller.max_datagram_size
        self._bucket_s = bucket_s
        self._applied: tuple[float | None, float | None] | None = None  # (rate, min_rtt) given to the pacer

    def next_send_time(self, now: float) -> float | None:
        # Asked before every packet: the pacer is only reconfigured when the rate or min_rtt moved.
        controller = self._controller
        rate, min_rtt = controller.pacing_rate, controller.min_rtt
        if (rate, min_rtt) != self._applied:
            self._applied = (rate, min_rtt)
            if min_rtt is not None:
                self._pacer.set_bucket(max(self._bucket_s, min(min_rtt * K_BUCKET_RTT_SHARE, K_BUCKET_MAX)))
            self._pacer.set_rate(rate, now=now)
        return self._pacer.next_send_time(now=now)

    def update_after_send(self, now: float) -> None:
        self._pacer.on_sent(now=now, size=self._size)

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        """aioquic's own rate rule (cwnd / srtt) is ignored: the controller's pacing rate rules."""


def install(connection: QuicConnection, controller: CongestionController, *, bucket_s: float) -> AioquicController:
    """Replace ``connection``'s controller and pacer; call before the first packet is sent."""
    loss = getattr(connection, "_loss", None)
    if loss is None or not hasattr(loss, "_cc") or not hasattr(loss, "_pacer"):
        raise RuntimeError("unsupported aioquic version: QuicConnection._loss._cc/_pacer not found")
    if loss.bytes_in_flight:
        raise RuntimeError("install() must run before the connection sends")
    adapter = AioquicController(controller)
    loss._cc = adapter
    pacer = Pacer(max_datagram_size=controller.max_datagram_size, bucket_s=bucket_s)
    loss._pacer = AioquicPacer(controller, pacer, bucket_s=bucket_s)
    return adapter
