"""The userspace link emulator's pure core: one direction of an emulated link.

Rules of this module:

1. Pure: no I/O, no clock, no sockets. Every time-dependent call takes keyword-only ``now``
   (seconds on any monotonic clock); the adapter (``tun_forwarder``) stamps packets and pulls
   due packets out.
2. A packet that enters a direction meets, in this order (the fact sheet's model, like netem with
   ``loss`` + ``rate`` + ``delay``):

   a. random loss with probability ``loss`` (cause ``loss``),
   b. a rate limiter of ``rate_bps`` bits per second fed by a tail-drop FIFO holding at most
      ``queue_bytes`` bytes of backlog (cause ``queue``),
   c. a fixed one-way delay ``delay_s`` after the packet has been serialized,
   d. with ``tick_s`` > 0, delivery on the next tick: delivery times are rounded up to a multiple of
      ``tick_s`` after ``tick_s / 2`` was taken off the delay, so each delivery is off by at most half
      a tick and the mean delay of packets sent at random phases stays ``delay_s``. A packet sent
      right after a delivery (an ACK, an echo) comes early by up to half a tick. See rule 5 for why.

3. The FIFO and the delay line are one deque: with a fixed delay, delivery times are monotonic, so
   nothing needs a heap. The backlog is derived from the serializer's ``busy_until`` time rather than
   stored, which keeps the per-packet work to a handful of float operations (this runs once per
   packet in a Python loop that must reach about 1 Gbit/s).
4. Counters (:class:`DirectionStats`) say what the emulator did so that every run can be checked
   against its settings: packets/bytes in and out, drops by cause, queue peaks, lateness of the
   adapter's writes (the ``now`` of :meth:`EmuDirection.pop_due` minus each packet's delivery time).
5. The tick exists because the emulator shares the host's CPUs with both endpoints. Released one by
   one, a 100 Mbit/s flow wakes the real-time emulator about 8,000 times a second, each wake-up
   preempting whichever endpoint runs on that CPU, and wakes the receiver once per packet. A
   userspace transport pays for that in CPU that a real network never takes from it; kernel TCP does
   its work inside the emulator's own writes. A tick of 250 us releases packets in batches, as a NIC
   moderating its interrupts to 4,000 a second delivers them (``fedgate/bench/RESULTS.md``, runs
   15-17, has the figures both ways). Lateness (rule 4) is counted from the tick.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from fedgate.configtree import bounds

__all__ = ["DirectionShape", "DirectionStats", "EmuDirection", "default_queue_bytes"]

K_MIN_QUEUE_BYTES = 64 * 1500  # bytes; the smallest tail-drop queue, so tiny BDPs still buffer a burst


@dataclass(frozen=True, slots=True)
class DirectionShape:
    """What one direction of the emulated link does to packets."""

    delay_s: float = field(default=0.0, metadata=bounds(ge=0, le=10))
    """Fixed one-way delay added after serialization, in seconds."""
    loss: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    """Probability that a packet is dropped at random on entry (0..1, not percent)."""
    rate_bps: float = field(default=0.0, metadata=bounds(ge=0))
    """Bottleneck rate in bits per second of IP packet bytes; 0 means unlimited (no queue)."""
    queue_bytes: int = field(default=K_MIN_QUEUE_BYTES, metadata=bounds(ge=1500))
    """Tail-drop limit of the rate limiter's backlog, in bytes (IP packet bytes)."""
    tick_s: float = field(default=0.0, metadata=bounds(ge=0, le=0.01))
    """Deliveries are released on a grid of this many seconds (rule 2d); 0 means exactly when due."""


def default_queue_bytes(rate_bps: float, rtt_s: float, *, bdp_multiple: float = 1.0) -> int:
    """About one bandwidth-delay product of queue, in bytes, never below K_MIN_QUEUE_BYTES."""
    return max(K_MIN_QUEUE_BYTES, int(rate_bps * rtt_s * bdp_multiple / 8))


@dataclass(frozen=True, slots=True)
class DirectionStats:
    """A snapshot of one direction's counters since the last reset."""

    packets_in: int
    """Packets offered to the direction."""
    bytes_in: int
    """IP bytes offered to the direction."""
    packets_out: int
    """Packets handed back for delivery (their delay has passed)."""
    bytes_out: int
    """IP bytes handed back for delivery."""
    drop_loss: int
    """Packets dropped by the random-loss stage."""
    drop_queue: int
    """Packets dropped because the tail-drop queue was full (self-inflicted loss)."""
    in_flight: int
    """Packets accepted but not yet delivered (queued or in the delay line)."""
    queue_peak_bytes: int
    """Largest backlog (bytes waiting for the serializer) seen on arrival of a packet."""
    late_max_s: float
    """Largest lateness of a delivery (write time minus due time), in seconds."""
    late_sum_s: float
    """Sum of the lateness of all deliveries, in seconds (divide by packets_out for the mean)."""

    def as_dict(self) -> dict[str, float | int]:
        """Plain data for JSON."""
        return {name: getattr(self, name) for name in self.__slots__}


class EmuDirection:
    """One direction of an emulated link: loss, rate limiter with tail-drop queue, fixed delay."""

    __slots__ = (
        "_busy_until",
        "_bytes_in",
        "_bytes_out",
        "_delay",
        "_drop_loss",
        "_drop_queue",
        "_late_max",
        "_late_sum",
        "_line",
        "_loss",
        "_packets_in",
        "_packets_out",
        "_queue_bytes",
        "_queue_peak",
        "_random",
        "_rate_Bps",
        "_sec_per_byte",
        "_tick",
    )

    def __init__(self, shape: DirectionShape, *, seed: int) -> None:
        self._random = random.Random(seed).random
        self._line: deque[tuple[float, bytes]] = deque()
        self._busy_until = 0.0
        self.reshape(shape)
        self.reset_stats()

    def reshape(self, shape: DirectionShape) -> None:
        """Apply new settings; packets already accepted keep their delivery times."""
        self._loss = shape.loss
        self._delay = shape.delay_s
        self._rate_Bps = shape.rate_bps / 8.0
        # precomputed: serialization time per byte (0 when unlimited)
        self._sec_per_byte = 8.0 / shape.rate_bps if shape.rate_bps > 0 else 0.0
        self._queue_bytes = shape.queue_bytes
        self._tick = shape.tick_s

    def reset_stats(self) -> None:
        """Zero the counters (the delay line keeps its packets; they count as in flight)."""
        self._packets_in = self._bytes_in = 0
        self._packets_out = self._bytes_out = 0
        self._drop_loss = self._drop_queue = 0
        self._queue_peak = 0
        self._late_max = self._late_sum = 0.0

    def offer(self, packet: bytes, *, now: float) -> bool:
        """Offer one packet; returns False when it was dropped (loss or full queue)."""
        size = len(packet)
        self._packets_in += 1
        self._bytes_in += size
        if self._loss and self._random() < self._loss:
            self._drop_loss += 1
            return False
        spb = self._sec_per_byte
        if spb:
            busy = self._busy_until
            if busy > now:
                backlog = int((busy - now) * self._rate_Bps)
                if backlog + size > self._queue_bytes:
                    self._drop_queue += 1
                    return False
                if backlog > self._queue_peak:
                    self._queue_peak = backlog
            else:
                busy = now
            busy += size * spb
            self._busy_until = busy
        else:
            busy = now
        tick = self._tick
        if tick:
            # rule 2d: the grid point at or after (due - tick / 2); monotonic in busy, so the line stays sorted
            self._line.append((math.ceil((busy + self._delay) / tick - 0.5) * tick, packet))
        else:
            self._line.append((busy + self._delay, packet))
        return True

    def next_due(self) -> float | None:
        """When the next packet is due for delivery, or None when the line is empty."""
        return self._line[0][0] if self._line else None

    def pop_due(self, *, now: float) -> list[bytes]:
        """Remove and return every packet whose delivery time has come, oldest first."""
        line = self._line
        out: list[bytes] = []
        late_max = self._late_max
        late_sum = 0.0
        while line and line[0][0] <= now:
            due, packet = line.popleft()
            late = now - due
            late_sum += late
            if late > late_max:
                late_max = late
            out.append(packet)
            self._bytes_out += len(packet)
        self._packets_out += len(out)
        self._late_sum += late_sum
        self._late_max = late_max
        return out

    def stats(self) -> DirectionStats:
        """A frozen snapshot of the counters."""
        return DirectionStats(
            packets_in=self._packets_in,
            bytes_in=self._bytes_in,
            packets_out=self._packets_out,
            bytes_out=self._bytes_out,
            drop_loss=self._drop_loss,
            drop_queue=self._drop_queue,
            in_flight=len(self._line),
            queue_peak_bytes=self._queue_peak,
            late_max_s=self._late_max,
            late_sum_s=self._late_sum,
        )
