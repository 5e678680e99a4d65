"""A discrete-event simulator of senders sharing one bottleneck, in virtual time.

Rules of this module:

1. Pure and deterministic: no clock, no sleeps, no I/O; randomness comes from ``random.Random(seed)``.
   Scenario tests and benchmarks of the controllers run here, never against the wall clock.
2. The path per direction is what the WAN emulator applies: random loss first, then a rate limiter
   with a tail-drop queue (``queue_bytes``, one BDP by default), then a fixed delay. Acks travel back
   after the propagation delay and are never lost (QUIC acks are cumulative ranges).
3. Each flow is a bulk sender with a controller and a :class:`~fedgate.congestion._pacer.Pacer`:
   it sends whenever the window and the pacer allow. Loss detection is RFC 9002's: three packets
   acked after a packet, or 9/8 RTT since it was sent, or a probe timeout.
4. Packets dropped by the queue are "overflow" (self-inflicted); packets dropped by the random-loss
   stage are "random". Results count both separately.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

from fedgate.congestion._base import CongestionController, CongestionControllerFactory
from fedgate.congestion._pacer import Pacer

__all__ = ["FlowResult", "FlowSpec", "LinkSpec", "SimResult", "Simulation"]

K_PACKET_THRESHOLD = 3  # packets (RFC 9002 section 6.1.1)
K_TIME_THRESHOLD = 9 / 8  # fraction of the RTT (RFC 9002 section 6.1.2)
K_PTO_MIN = 0.01  # seconds, floor of the probe timeout

_EV_SEND = 0
_EV_ACK = 1
_EV_TIMER = 2


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """The bottleneck path."""

    rate_bps: float
    """Bottleneck rate, bits per second."""
    rtt: float
    """Round-trip propagation delay, seconds."""
    loss: float = 0.0
    """Probability that a data packet is dropped before the bottleneck."""
    queue_bytes: int | None = None
    """Tail-drop queue limit, bytes; None = one bandwidth-delay product."""
    ack_burst: float = 0.0
    """Acks are held and released together at multiples of this many seconds (receiver batching,
    busy hosts); 0 = each ack travels alone."""

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.rate_bps / 8

    @property
    def queue_limit(self) -> int:
        if self.queue_bytes is not None:
            return self.queue_bytes
        return max(int(self.rate * self.rtt), 3000)


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """One bulk sender."""

    controller: CongestionControllerFactory
    start: float = 0.0
    """Seconds of virtual time when the flow begins."""
    stop: float | None = None
    """Seconds when it stops sending new packets; None = never."""
    packet_size: int = 1200
    """Bytes per packet."""


@dataclass(slots=True)
class FlowResult:
    packets_sent: int = 0
    packets_acked: int = 0
    bytes_acked: int = 0
    random_drops: int = 0
    overflow_drops: int = 0
    declared_lost: int = 0
    acked_per_second: list[int] = field(default_factory=list)
    """Bytes acked in each one-second bucket of virtual time since t=0."""

    def goodput(self, start: float, end: float) -> float:
        """Mean bytes per second acked over whole seconds [start, end)."""
        lo, hi = int(start), int(end)
        buckets = self.acked_per_second[lo:hi]
        return sum(buckets) / max(hi - lo, 1)


@dataclass(slots=True)
class SimResult:
    flows: list[FlowResult]
    controllers: list[CongestionController]
    max_queue_bytes: int
    duration: float

    @property
    def overflow_fraction(self) -> float:
        """Overflow drops as a fraction of all packets sent."""
        sent = sum(f.packets_sent for f in self.flows)
        return sum(f.overflow_drops for f in self.flows) / max(sent, 1)


@dataclass(slots=True)
class _Flow:
    spec: FlowSpec
    cc: CongestionController
    pacer: Pacer
    result: FlowResult
    outstanding: OrderedDict[int, float] = field(default_factory=OrderedDict)
    next_id: int = 0
    send_at: float | None = None
    timer_at: float | None = None
    largest_acked: int = -1


class Simulation:
    """Run flows over one bottleneck; ``run(duration)`` returns per-flow results."""

    def __init__(self, link: LinkSpec, flows: list[FlowSpec], *, seed: int = 1) -> None:
        self.link = link
        self._rng = random.Random(seed)
        self._events: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self._busy_until = 0.0
        self._max_queue = 0
        self._flows = [
            _Flow(
                spec=spec,
                cc=spec.controller(max_datagram_size=spec.packet_size),
                pacer=Pacer(max_datagram_size=spec.packet_size),
                result=FlowResult(),
            )
            for spec in flows
        ]
        for index, flow in enumerate(self._flows):
            self._schedule_send(index, flow, flow.spec.start)

    def run(self, duration: float) -> SimResult:
        buckets = int(duration) + 1
        for flow in self._flows:
            flow.result.acked_per_second = [0] * buckets
        events = self._events
        while events and events[0][0] <= duration:
            now, _, kind, index, arg = heapq.heappop(events)
            flow = self._flows[index]
            if kind == _EV_SEND:
                if flow.send_at == now:
                    flow.send_at = None
                    self._try_send(index, flow, now)
            elif kind == _EV_ACK:
                self._on_ack(index, flow, now, arg)
            elif flow.timer_at == now:
                flow.timer_at = None
                self._on_timer(index, flow, now)
        return SimResult(
            flows=[f.result for f in self._flows],
            controllers=[f.cc for f in self._flows],
            max_queue_bytes=self._max_queue,
            duration=duration,
        )

    # -- events -----------------------------------------------------------------------------------

    def _push(self, when: float, kind: int, index: int, arg: int) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, index, arg))

    def _schedule_send(self, index: int, flow: _Flow, when: float) -> None:
        if flow.send_at is None or when < flow.send_at:
            flow.send_at = when
            self._push(when, _EV_SEND, index, 0)

    def _arm_timer(self, index: int, flow: _Flow, now: float) -> None:
        if not flow.outstanding:
            return
        srtt = flow.cc.smoothed_rtt or self.link.rtt * 2
        when = next(iter(flow.outstanding.values())) + max(2 * srtt, K_PTO_MIN)
        if when <= now:
            when = now + K_PTO_MIN
        if flow.timer_at is None or when < flow.timer_at:
            flow.timer_at = when
            self._push(when, _EV_TIMER, index, 0)

    def _try_send(self, index: int, flow: _Flow, now: float) -> None:
        spec = flow.spec
        if spec.stop is not None and now >= spec.stop:
            return
        size = spec.packet_size
        cc, pacer = flow.cc, flow.pacer
        link = self.link
        while cc.can_send(size):
            pacer.set_rate(cc.pacing_rate, now=now)
            at = pacer.next_send_time(now=now)
            if at is not None:
                self._schedule_send(index, flow, at)
                break
            packet_id = flow.next_id
            flow.next_id += 1
            cc.on_packet_sent(now=now, packet_id=packet_id, size=size)
            pacer.on_sent(now=now, size=size)
            flow.outstanding[packet_id] = now
            flow.result.packets_sent += 1
            if link.loss and self._rng.random() < link.loss:
                flow.result.random_drops += 1
                continue
            queued = max(self._busy_until - now, 0.0) * link.rate
            if queued > self._max_queue:
                self._max_queue = int(queued)
            if queued + size > link.queue_limit:
                flow.result.overflow_drops += 1
                continue
            depart = max(now, self._busy_until) + size / link.rate
            self._busy_until = depart
            ack_at = depart + link.rtt
            if link.ack_burst > 0:
                ack_at = math.ceil(ack_at / link.ack_burst) * link.ack_burst
            self._push(ack_at, _EV_ACK, index, packet_id)
        self._arm_timer(index, flow, now)

    def _on_ack(self, index: int, flow: _Flow, now: float, packet_id: int) -> None:
        if flow.outstanding.pop(packet_id, None) is None:
            return  # already declared lost
        cc = flow.cc
        size = flow.spec.packet_size
        cc.on_packet_acked(now=now, packet_id=packet_id)
        flow.result.packets_acked += 1
        flow.result.bytes_acked += size
        second = int(now)
        if second < len(flow.result.acked_per_second):
            flow.result.acked_per_second[second] += size
        if packet_id > flow.largest_acked:
            flow.largest_acked = packet_id
        self._detect_loss(flow, now)
        self._try_send(index, flow, now)

    def _on_timer(self, index: int, flow: _Flow, now: float) -> None:
        srtt = flow.cc.smoothed_rtt or self.link.rtt
        lost = [pid for pid, sent in flow.outstanding.items() if sent <= now - K_TIME_THRESHOLD * srtt]
        self._declare_lost(flow, now, lost)
        self._try_send(index, flow, now)
        self._arm_timer(index, flow, now)

    def _detect_loss(self, flow: _Flow, now: float) -> None:
        srtt = flow.cc.smoothed_rtt or self.link.rtt
        threshold_time = now - K_TIME_THRESHOLD * srtt
        largest = flow.largest_acked
        lost: list[int] = []
        for pid, sent in flow.outstanding.items():
            if pid >= largest:
                break
            if pid <= largest - K_PACKET_THRESHOLD or sent <= threshold_time:
                lost.append(pid)
            else:
                break
        self._declare_lost(flow, now, lost)

    def _declare_lost(self, flow: _Flow, now: float, lost: list[int]) -> None:
        if not lost:
            return
        for pid in lost:
            del flow.outstanding[pid]
        flow.result.declared_lost += len(lost)
        flow.cc.on_packets_lost(now=now, packet_ids=lost)
