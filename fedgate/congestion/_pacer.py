"""A token-bucket pacer driven by a controller's pacing rate.

Rules of this module:

1. Pure (no clock): ``next_send_time(now=...)`` answers when the next packet may leave,
   ``on_sent(now=..., size=...)`` spends tokens.
2. The bucket holds at least ``bucket_s`` seconds of data at the current rate (and at least two
   datagrams). An event loop wakes timers with ~1 ms granularity, so a bucket smaller than ~2 ms of
   data would cap the rate below the controller's; a larger one only allows a short burst.
3. Tokens may go negative by at most one packet: a packet is released whenever the balance is
   positive, so the long-run rate is exact even for packets larger than the remaining balance.
4. An empty bucket is refilled to a wake-up quantum (``quantum_s`` of data, at least one byte,
   at most the bucket) before the next release: one timer per ~1 ms of data, not one per datagram.
   Timers that fire per datagram (every 116 us at 100 Mbit/s) cost more CPU than the packets
   themselves and, with 1 ms loop timers, fire early and spin.
"""

from __future__ import annotations

__all__ = ["Pacer"]

K_DEFAULT_BUCKET = 0.004  # seconds of data at the pacing rate
K_MIN_BUCKET_PACKETS = 2  # datagrams
K_DEFAULT_QUANTUM = 0.001  # seconds of data released per wake-up once the bucket ran dry


class Pacer:
    """Token bucket; a rate of None means unpaced."""

    def __init__(
        self,
        *,
        max_datagram_size: int,
        bucket_s: float = K_DEFAULT_BUCKET,
        quantum_s: float = K_DEFAULT_QUANTUM,
    ) -> None:
        if bucket_s <= 0:
            raise ValueError("bucket_s must be > 0")
        if quantum_s < 0:
            raise ValueError("quantum_s must be >= 0")
        self._mds = max_datagram_size
        self._bucket_s = bucket_s
        self._quantum_s = quantum_s
        self._rate: float | None = None
        self._capacity = float(K_MIN_BUCKET_PACKETS * max_datagram_size)
        self._tokens = self._capacity
        self._stamp: float | None = None

    @property
    def rate(self) -> float | None:
        """Bytes per second, or None when unpaced."""
        return self._rate

    @property
    def capacity(self) -> float:
        """Bucket size, bytes."""
        return self._capacity

    def set_bucket(self, bucket_s: float) -> None:
        """Change the bucket size, seconds of data at the current rate (applied at the next set_rate)."""
        if bucket_s <= 0:
            raise ValueError("bucket_s must be > 0")
        self._bucket_s = bucket_s

    def set_rate(self, rate: float | None, *, now: float) -> None:
        """Change the rate (bytes per second); tokens earned so far are kept."""
        self._refill(now)
        if rate is not None and rate <= 0:
            rate = None
        self._rate = rate
        if rate is None:
            return
        self._capacity = max(rate * self._bucket_s, float(K_MIN_BUCKET_PACKETS * self._mds))
        if self._tokens > self._capacity:
            self._tokens = self._capacity

    def next_send_time(self, *, now: float) -> float | None:
        """None if a packet may leave now, else the time it may."""
        if self._rate is None:
            return None
        self._refill(now)
        if self._tokens > 0:
            return None
        quantum = min(max(self._rate * self._quantum_s, 1.0), self._capacity)
        return now + (quantum - self._tokens) / self._rate

    def on_sent(self, *, now: float, size: int) -> None:
        if self._rate is None:
            return
        self._refill(now)
        self._tokens = max(self._tokens - size, -float(self._mds))

    def _refill(self, now: float) -> None:
        if self._stamp is None:
            self._stamp = now
            return
        elapsed = now - self._stamp
        if elapsed > 0:
            self._stamp = now
            if self._rate is not None:
                self._tokens = min(self._tokens + elapsed * self._rate, self._capacity)
