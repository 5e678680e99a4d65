"""NewReno (RFC 9002 section 7 and appendix B), kept for comparison with the model-based controller.

Rules of this module:

1. Pure (see ``_base``). Every loss is congestion: this is the behaviour the loss-tolerant controller
   is measured against, so it stays textbook.
2. One window reduction per recovery period: losses of packets sent before the period began do not
   reduce the window again (RFC 9002 section 7.3.2).
"""

from __future__ import annotations

from fedgate.congestion._base import (
    K_INITIAL_WINDOW_PACKETS,
    K_MINIMUM_WINDOW_PACKETS,
    CongestionController,
    RateSample,
    SentPacket,
)

__all__ = ["NewReno"]

K_LOSS_REDUCTION_FACTOR = 0.5  # multiplier of the window on a congestion event (RFC 9002 section 7.3.2)
K_PACING_GAIN = 1.25  # pacing rate = gain x cwnd / srtt (RFC 9002 section 7.7 suggests N = 1.25)


class NewReno(CongestionController):
    """RFC 9002 NewReno with pacing at 1.25 x cwnd / srtt."""

    name = "newreno"

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._cwnd = K_INITIAL_WINDOW_PACKETS * max_datagram_size
        self._ssthresh: int | None = None
        self._recovery_start: float | None = None
        self._acked_accumulator = 0

    @property
    def congestion_window(self) -> int:
        return self._cwnd

    @property
    def pacing_rate(self) -> float | None:
        if self._smoothed_rtt is None:
            return None
        return K_PACING_GAIN * self._cwnd / self._smoothed_rtt

    def _state_name(self) -> str:
        if self._ssthresh is None or self._cwnd < self._ssthresh:
            return "slow_start"
        return "congestion_avoidance"

    def _on_acked(self, *, now: float, packet: SentPacket, sample: RateSample) -> None:
        # don't increase the window in congestion recovery (RFC 9002 section 7.3.2)
        if self._recovery_start is not None and packet.sent_time <= self._recovery_start:
            return
        if self._ssthresh is None or self._cwnd < self._ssthresh:
            self._cwnd += packet.size
            return
        # congestion avoidance: one datagram per window acked (RFC 9002 section 7.3.3)
        self._acked_accumulator += packet.size
        if self._acked_accumulator >= self._cwnd:
            self._acked_accumulator -= self._cwnd
            self._cwnd += self.max_datagram_size

    def _on_lost(self, *, now: float, packets: list[SentPacket]) -> None:
        largest_sent = max(p.sent_time for p in packets)
        if self._recovery_start is not None and largest_sent <= self._recovery_start:
            return
        self._recovery_start = now
        self._count_congestion_event()
        self._cwnd = max(int(self._cwnd * K_LOSS_REDUCTION_FACTOR), K_MINIMUM_WINDOW_PACKETS * self.max_datagram_size)
        self._ssthresh = self._cwnd
        self._acked_accumulator = 0

    def _on_persistent_congestion(self, *, now: float) -> None:
        # RFC 9002 section 7.6.2: collapse to the minimum window.
        self._cwnd = K_MINIMUM_WINDOW_PACKETS * self.max_datagram_size
        self._recovery_start = now
