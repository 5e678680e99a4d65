"""The congestion-controller seam: one interface, with the per-packet bookkeeping every controller shares.

Rules of this module:

1. Pure: no asyncio, socket, time or aioquic imports. Every time-dependent method takes a keyword-only
   ``now`` in seconds (any monotonic origin; the caller's clock).
2. The controller owns the bytes in flight: each packet counted in flight is reported exactly once as
   acked, lost or discarded. Packet ids are opaque ints chosen by the caller, unique among the packets
   in flight, and increasing in send order.
3. Sizes are bytes, rates are bytes per second, times and durations are seconds.
4. Delivery-rate samples follow draft-cheng-iccrg-delivery-rate-estimation: each packet remembers how
   much had been delivered when it was sent; when it is acked, (delivered now - delivered then) over the
   longer of the send and ack intervals is one sample.
5. Subclasses implement the ``_on_*`` hooks and the outputs (``congestion_window``, ``pacing_rate``);
   they never touch the in-flight table directly.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol

__all__ = [
    "CongestionController",
    "CongestionControllerFactory",
    "CongestionStatistics",
    "RateSample",
    "SentPacket",
]

K_INITIAL_WINDOW_PACKETS = 10  # packets (RFC 9002 section 7.2)
K_MINIMUM_WINDOW_PACKETS = 2  # packets (RFC 9002 section 7.2)
K_RTT_ALPHA = 0.125  # weight of a new sample in the smoothed RTT (RFC 6298)
K_MIN_RTT_SAMPLE = 0.001  # seconds: event-loop clocks tick in milliseconds (aioquic floors RTT the same way)


@dataclass(slots=True)
class SentPacket:
    """What the controller remembers about one packet in flight."""

    size: int
    """Bytes counted in flight."""
    sent_time: float
    """When it was sent, seconds."""
    delivered: int
    """Bytes delivered (acked) when it was sent."""
    delivered_time: float
    """When ``delivered`` last grew, as of the send, seconds."""
    first_sent_time: float
    """Send time of the packet that started the current delivery interval, seconds."""
    app_limited: bool
    """Sent while the sender was application-limited (its rate sample may underestimate)."""
    lost_at_send: int
    """Bytes lost so far when it was sent."""


@dataclass(frozen=True, slots=True)
class RateSample:
    """One delivery-rate sample, produced by an ack."""

    delivery_rate: float
    """Bytes per second delivered over the sample's interval; 0 when the interval was unusable."""
    interval: float
    """Length of the sample's interval, seconds."""
    rtt: float
    """Round-trip time of the acked packet, seconds."""
    app_limited: bool
    """The interval included application-limited sending."""
    prior_delivered: int
    """Bytes delivered when the acked packet was sent (round accounting)."""


@dataclass(frozen=True, slots=True)
class CongestionStatistics:
    """A snapshot of a controller (trio-style ``statistics()``)."""

    name: str
    state: str
    congestion_window: int
    """Bytes."""
    bytes_in_flight: int
    pacing_rate: float | None
    """Bytes per second; None when the controller does not pace."""
    bandwidth_estimate: float | None
    """Bytes per second; None for controllers without a bandwidth model."""
    min_rtt: float | None
    """Seconds."""
    smoothed_rtt: float | None
    """Seconds."""
    delivered_bytes: int
    lost_bytes: int
    packets_sent: int
    packets_acked: int
    packets_lost: int
    congestion_events: int
    """How many times the controller backed off."""


class CongestionController(abc.ABC):
    """A sans-IO congestion controller: fed packet events with ``now``; answers window and pacing rate."""

    name: ClassVar[str] = "abstract"

    def __init__(self, *, max_datagram_size: int) -> None:
        if max_datagram_size <= 0:
            raise ValueError("max_datagram_size must be > 0")
        self.max_datagram_size = max_datagram_size
        self._in_flight: dict[int, SentPacket] = {}
        self._bytes_in_flight = 0
        self._delivered = 0
        self._delivered_time = 0.0
        self._first_sent_time = 0.0
        self._lost = 0
        self._app_limited_until = 0  # delivered-bytes mark; 0 = not app-limited
        self._min_rtt: float | None = None
        self._smoothed_rtt: float | None = None
        self._latest_rtt: float | None = None
        self._packets_sent = 0
        self._packets_acked = 0
        self._packets_lost = 0
        self._congestion_events = 0

    # -- inputs -----------------------------------------------------------------------------------

    def on_packet_sent(self, *, now: float, packet_id: int, size: int) -> None:
        """A packet of ``size`` bytes counted in flight left at ``now``."""
        if not self._in_flight:
            # Restart the delivery interval after an idle period, so idle time is not counted as
            # delivery time (delivery-rate estimation draft, section 3.2).
            self._first_sent_time = now
            self._delivered_time = now
        self._in_flight[packet_id] = SentPacket(
            size=size,
            sent_time=now,
            delivered=self._delivered,
            delivered_time=self._delivered_time,
            first_sent_time=self._first_sent_time,
            app_limited=self._app_limited_until > 0,
            lost_at_send=self._lost,
        )
        self._bytes_in_flight += size
        self._packets_sent += 1

    def on_packet_acked(self, *, now: float, packet_id: int) -> None:
        """The peer acknowledged a packet in flight; unknown ids are ignored."""
        packet = self._in_flight.pop(packet_id, None)
        if packet is None:
            return
        self._bytes_in_flight -= packet.size
        self._packets_acked += 1
        self._delivered += packet.size
        self._delivered_time = now
        if packet.sent_time >= self._first_sent_time:
            self._first_sent_time = packet.sent_time
        if self._app_limited_until and self._delivered > self._app_limited_until:
            self._app_limited_until = 0
        rtt = max(now - packet.sent_time, K_MIN_RTT_SAMPLE)
        self._update_rtt(rtt)
        send_elapsed = packet.sent_time - packet.first_sent_time
        ack_elapsed = now - packet.delivered_time
        interval = max(send_elapsed, ack_elapsed)
        # An interval shorter than the min RTT comes from ack compression and overestimates.
        min_rtt = self._min_rtt if self._min_rtt is not None else rtt
        rate = (self._delivered - packet.delivered) / interval if interval >= min_rtt and interval > 0 else 0.0
        self._on_acked(
            now=now,
            packet=packet,
            sample=RateSample(
                delivery_rate=rate,
                interval=interval,
                rtt=rtt,
                app_limited=packet.app_limited,
                prior_delivered=packet.delivered,
            ),
        )

    def on_packets_lost(self, *, now: float, packet_ids: Iterable[int]) -> None:
        """Loss detection declared these packets lost; unknown ids are ignored."""
        lost: list[SentPacket] = []
        for packet_id in packet_ids:
            packet = self._in_flight.pop(packet_id, None)
            if packet is None:
                continue
            self._bytes_in_flight -= packet.size
            self._lost += packet.size
            self._packets_lost += 1
            lost.append(packet)
        if lost:
            self._on_lost(now=now, packets=lost)

    def on_packets_discarded(self, *, packet_ids: Iterable[int]) -> None:
        """Stop counting packets in flight without a congestion signal (keys dropped, PTO requeue)."""
        for packet_id in packet_ids:
            packet = self._in_flight.pop(packet_id, None)
            if packet is not None:
                self._bytes_in_flight -= packet.size

    def on_app_limited(self, *, now: float) -> None:
        """The sender had room to send but nothing to send: mark samples until this flight is acked."""
        self._app_limited_until = max(self._delivered + self._bytes_in_flight, 1)

    def on_persistent_congestion(self, *, now: float) -> None:
        """RFC 9002 section 7.6: every packet over a long period was lost (path outage)."""
        self._congestion_events += 1
        self._on_persistent_congestion(now=now)

    # -- outputs ----------------------------------------------------------------------------------

    @property
    def bytes_in_flight(self) -> int:
        return self._bytes_in_flight

    @property
    @abc.abstractmethod
    def congestion_window(self) -> int:
        """Bytes the sender may have in flight."""

    @property
    @abc.abstractmethod
    def pacing_rate(self) -> float | None:
        """Bytes per second the pacer releases; None for no pacing."""

    @property
    def min_rtt(self) -> float | None:
        return self._min_rtt

    @property
    def smoothed_rtt(self) -> float | None:
        return self._smoothed_rtt

    @property
    def delivered(self) -> int:
        """Bytes acked so far."""
        return self._delivered

    def can_send(self, size: int) -> bool:
        """True if a packet of ``size`` bytes fits in the window now."""
        return self._bytes_in_flight + size <= self.congestion_window

    def statistics(self) -> CongestionStatistics:
        return CongestionStatistics(
            name=self.name,
            state=self._state_name(),
            congestion_window=self.congestion_window,
            bytes_in_flight=self._bytes_in_flight,
            pacing_rate=self.pacing_rate,
            bandwidth_estimate=self._bandwidth_estimate(),
            min_rtt=self._min_rtt,
            smoothed_rtt=self._smoothed_rtt,
            delivered_bytes=self._delivered,
            lost_bytes=self._lost,
            packets_sent=self._packets_sent,
            packets_acked=self._packets_acked,
            packets_lost=self._packets_lost,
            congestion_events=self._congestion_events,
        )

    # -- hooks ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _on_acked(self, *, now: float, packet: SentPacket, sample: RateSample) -> None:
        """Called for each acked packet, after the counters were updated."""

    @abc.abstractmethod
    def _on_lost(self, *, now: float, packets: list[SentPacket]) -> None:
        """Called once per loss-detection batch, after the counters were updated."""

    @abc.abstractmethod
    def _on_persistent_congestion(self, *, now: float) -> None: ...

    def _state_name(self) -> str:
        return "open"

    def _bandwidth_estimate(self) -> float | None:
        return None

    def _count_congestion_event(self) -> None:
        self._congestion_events += 1

    def _update_rtt(self, rtt: float) -> None:
        self._latest_rtt = rtt
        if self._min_rtt is None or rtt < self._min_rtt:
            self._min_rtt = rtt
        if self._smoothed_rtt is None:
            self._smoothed_rtt = rtt
        else:
            self._smoothed_rtt += K_RTT_ALPHA * (rtt - self._smoothed_rtt)


class CongestionControllerFactory(Protocol):
    """Builds a fresh controller for one connection."""

    def __call__(self, *, max_datagram_size: int) -> CongestionController: ...
