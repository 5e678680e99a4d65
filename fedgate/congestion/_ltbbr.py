"""LT-BBR: fedgate's model-based, loss-tolerant congestion controller.

Rules of this module:

1. Pure (see ``_base``). The model is BBR's (draft-cardwell-iccrg-bbr-congestion-control): a windowed
   max of delivery-rate samples (``bw``, over ``K_BW_WINDOW_ROUNDS`` round trips) and a windowed min
   of RTT samples (``min_rtt``, over ``K_MIN_RTT_WINDOW`` seconds). The sender paces at
   ``pacing_gain x bw`` and caps inflight at ``cwnd_gain x bw x min_rtt``. States:
   STARTUP (gain 2.885, cwnd gain 2) -> DRAIN -> PROBE_BW (gain cycle 1.25, 0.75, 1 x 6) <-> PROBE_RTT.
2. Random loss is noise. Losses are counted per measurement window (one round trip with at least
   ``K_MIN_WINDOW_PACKETS`` packets) together with the mean queueing delay (mean RTT - min RTT).
   Windows with a small queue teach the controller the path's random loss rate (``loss_baseline``).
3. Real congestion makes it back off. A window is congested when
   (a) the queue is high (delay > ``K_QUEUE_RATIO`` x min_rtt) and the loss rate exceeds the baseline
       by more than noise (``K_LOSS_MARGIN`` or three binomial standard deviations), or
   (b) the loss rate stayed above ``K_PERSISTENT_LOSS`` for ``K_PERSISTENT_ROUNDS`` windows.
   On congestion the usable bandwidth is capped (``bw_hi = K_BETA x`` the rate delivered in that
   window, but at least ``K_BETA_FLOOR x`` the model: a window of one round trip is short, and one
   noisy window cuts at most 30%, as BBRv2's bw_lo does per round), and so is the data in flight
   (``inflight_hi = K_BETA x`` the most that was in flight in that window); STARTUP ends, a bandwidth
   probe ends. ``bw_hi`` then grows by 1, 2, 4, ... packets per min_rtt in successive clean windows
   (the same absolute steps for every flow, so competing flows converge as under AIMD) and is
   released once it no longer binds. ``inflight_hi`` holds for ``K_INFLIGHT_HOLD`` seconds after the
   last congestion event, then grows the same way: the volume that overflowed the queue once is not
   tried again at once, while the rate recovers within a few round trips (at 20 ms RTT and a sender
   that sends in bursts, releasing both together overflowed the queue 2-4 times a second).
4. STARTUP also ends when the queue it builds exceeds ``K_STARTUP_QUEUE_RATIO`` x min_rtt, so that
   with a bottleneck buffer of one BDP the sender does not overflow it.
5. The cwnd target adds BBR's ack-aggregation allowance (``extra_acked``: data acked beyond what bw
   explains, max over ``K_BW_WINDOW_ROUNDS``, at most ``K_EXTRA_ACKED_MAX`` seconds of data).
6. PROBE_RTT drains to half a BDP (not four packets) for ``K_PROBE_RTT_DURATION`` and one round; it is
   skipped while RTT samples within ``K_MIN_RTT_TOLERANCE`` of min_rtt keep arriving.
7. STARTUP jumps instead of crawling. Doubling from ten packets needs log2(BDP / 10) round trips: 8
   at 100 Mbit/s and 320 ms, 2.6 s spent mostly idle. So the first flight is
   ``K_INITIAL_WINDOW_PACKETS`` (32, Chromium QUIC's initial window) sent back to back, and the
   spacing of its ACKs, which the bottleneck imposed, measures the bottleneck (packet-train
   dispersion). Once, in STARTUP, the model jumps to ``K_JUMP_FRACTION`` of that estimate (bw and
   cwnd), as Careful Resume jumps to half of a remembered rate; STARTUP then goes on as usual from
   there and its queue and full-bandwidth exits still apply. A train needs ``K_TRAIN_MIN_PACKETS``
   ACKed packets spread over ``K_TRAIN_MIN_SPAN`` (ACK compression shrinks the spread and would
   overestimate); faster links (under ~1.5 ms for the train) simply get no jump.
"""

from __future__ import annotations

import math
from collections import deque
from enum import Enum

from fedgate.congestion._base import (
    CongestionController,
    RateSample,
    SentPacket,
)

__all__ = ["LtBbr"]

K_STARTUP_GAIN = 2.885  # pacing gain in STARTUP (2 / ln 2)
K_STARTUP_CWND_GAIN = 2.0  # cwnd gain in STARTUP and DRAIN: at most one BDP queued
K_DRAIN_GAIN = 1 / 2.885  # pacing gain in DRAIN
K_CWND_GAIN = 2.0  # cwnd gain in PROBE_BW
K_PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # PROBE_BW pacing gain cycle, one phase per min_rtt
K_CRUISE_PHASE = 2  # index into K_PROBE_GAINS where PROBE_BW starts after DRAIN
K_BW_WINDOW_ROUNDS = 10  # round trips the max-bandwidth filter remembers
K_MIN_RTT_WINDOW = 10.0  # seconds the min-RTT filter remembers
K_MIN_RTT_TOLERANCE = 0.05  # fraction of min_rtt within which a sample refreshes the min-RTT stamp
K_PROBE_RTT_DURATION = 0.2  # seconds spent at the PROBE_RTT window
K_PROBE_RTT_CWND_GAIN = 0.5  # PROBE_RTT window, in BDPs
K_FULL_BW_GROWTH = 1.25  # STARTUP continues while bw grows by this factor per round...
K_FULL_BW_ROUNDS = 3  # ...within this many rounds
K_STARTUP_QUEUE_RATIO = 0.5  # STARTUP ends when the mean queueing delay exceeds this x min_rtt
K_MIN_CWND_PACKETS = 4  # packets
K_INITIAL_RTT = 0.1  # seconds, assumed before the first sample (RFC 9002 section 6.2.2)
K_MIN_WINDOW_PACKETS = 20  # packets a loss-measurement window needs before it is judged
K_QUEUE_RATIO = 0.25  # queueing delay (fraction of min_rtt) above which losses count as congestion
K_QUEUE_MIN_DELAY = 0.004  # seconds; smaller queueing delays are jitter, never "high"
K_LOSS_MARGIN = 0.01  # loss-rate excess over the baseline that counts as congestion (absolute)
K_LOSS_FLOOR = 0.005  # loss rate used for the noise estimate when the baseline is lower
K_BASELINE_MAX = 0.5  # the random-loss baseline never exceeds this
K_BASELINE_WINDOWS = 8  # the baseline is a running mean over the first windows, then an EWMA of 1/this
K_PERSISTENT_LOSS = 0.2  # loss rate that is congestion whatever the queue...
K_PERSISTENT_ROUNDS = 3  # ...when it lasts this many windows
K_BETA = 0.85  # bw_hi = K_BETA x delivery rate of the congested window...
K_BETA_FLOOR = 0.7  # ...but no less than this x the bandwidth model (one event cuts at most 30%)
K_INFLIGHT_HOLD = 2.0  # seconds inflight_hi holds after a congestion event before it grows
K_BW_HI_GROWTH_MAX_EXP = 16  # bw_hi grows by 2**k packets per min_rtt in the k-th clean window, k <= this
K_BW_HI_RELEASE = 2.0  # bw_hi is dropped once it exceeds this x the max filter
K_EXTRA_ACKED_MAX = 0.1  # seconds of data at bw: cap of the ack-aggregation allowance added to cwnd
K_INITIAL_WINDOW_PACKETS = 32  # first flight, sent unpaced: the packet train of rule 7
K_TRAIN_MIN_PACKETS = 8  # ACKed packets of one back-to-back flight an estimate needs
K_TRAIN_MIN_SPAN = 0.0015  # seconds between its first and last ACK an estimate needs
K_JUMP_FRACTION = 0.5  # STARTUP jumps to this fraction of the train's estimate


class LtBbrState(Enum):
    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW = "probe_bw"
    PROBE_RTT = "probe_rtt"


class _RoundMaxFilter:
    """Windowed max over round trips: a monotone deque of per-round maxima plus the current round."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._rounds: deque[tuple[int, float]] = deque()
        self._current = 0.0

    def offer(self, value: float) -> None:
        if value > self._current:
            self._current = value

    def end_round(self, round_count: int) -> None:
        value = self._current
        self._current = 0.0
        rounds = self._rounds
        while rounds and rounds[-1][1] <= value:
            rounds.pop()
        rounds.append((round_count, value))
        while rounds and rounds[0][0] <= round_count - self._window:
            rounds.popleft()

    def get(self) -> float:
        best = self._rounds[0][1] if self._rounds else 0.0
        return best if best > self._current else self._current

    def reset(self) -> None:
        self._rounds.clear()
        self._current = 0.0


class LtBbr(CongestionController):
    """Delivery-rate and min-RTT model with gain cycling; loss tolerant, backs off on real congestion."""

    name = "ltbbr"

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self.state = LtBbrState.STARTUP
        self._bw_filter = _RoundMaxFilter(K_BW_WINDOW_ROUNDS)
        self._bw_hi: float | None = None
        self._inflight_hi: float | None = None
        self._inflight_hold_until = 0.0
        self._round_count = 0
        self._next_round_delivered = 0
        self._full_bw = 0.0
        self._full_bw_count = 0
        self._filled_pipe = False
        self._startup_rate = 0.0  # the highest pacing rate used before the pipe filled
        # packet train (rule 7): ACKs of packets sent back to back share their ``delivered`` mark
        self._train_mark = -1
        self._train_first = 0.0
        self._train_base = 0
        self._train_packets = 0
        self._jumped = False
        self.train_estimate: float | None = None  # bytes per second, once measured
        self._model_min_rtt: float | None = None
        self._min_rtt_stamp = 0.0
        self._probe_rtt_done: float | None = None
        self._probe_rtt_round_done = False
        self._cycle_index = K_CRUISE_PHASE
        self._cycle_stamp = 0.0
        self._pacing_gain = K_STARTUP_GAIN
        self._cwnd_gain = K_STARTUP_CWND_GAIN
        self._cwnd = K_INITIAL_WINDOW_PACKETS * max_datagram_size
        # ack aggregation (BBR's extra_acked): data acked beyond what bw explains, max over rounds
        self._extra_filter = _RoundMaxFilter(K_BW_WINDOW_ROUNDS)
        self._agg_start: float | None = None
        self._agg_delivered = 0
        # loss-measurement window
        self._win_start: float | None = None
        self._win_acked = 0
        self._win_lost = 0
        self._win_packets = 0
        self._win_rtt_sum = 0.0
        self._win_rtt_n = 0
        self._win_inflight_max = 0
        self._loss_baseline = 0.0
        self._baseline_windows = 0
        self._high_loss_windows = 0
        self._clean_windows = 0
        self.windows_judged = 0
        self.last_window_loss = 0.0
        self.last_window_queue_delay = 0.0

    # -- outputs ----------------------------------------------------------------------------------

    @property
    def congestion_window(self) -> int:
        if self.state is LtBbrState.PROBE_RTT:
            return min(self._cwnd, self._probe_rtt_cwnd())
        return self._cwnd

    @property
    def pacing_rate(self) -> float | None:
        rate = self._pacing_gain * self._bw()
        if self._filled_pipe:
            return rate
        if not self._jumped and self._delivered < K_INITIAL_WINDOW_PACKETS * self.max_datagram_size:
            return None  # the first flight leaves back to back: it is the packet train (rule 7)
        # Until the pipe is full the rate never goes down (BBR's rule): the first rate samples of a
        # connection span its handshake (one datagram per RTT), and pacing at 2.9x that would crawl
        # for seconds on a long path instead of doubling every round from the initial window.
        rtt = self._smoothed_rtt if self._smoothed_rtt is not None else K_INITIAL_RTT
        initial = K_STARTUP_GAIN * K_INITIAL_WINDOW_PACKETS * self.max_datagram_size / max(rtt, 1e-4)
        return max(rate, initial, self._startup_rate)

    @property
    def loss_baseline(self) -> float:
        """The random-loss rate learned on windows with a small queue."""
        return self._loss_baseline

    @property
    def bw_hi(self) -> float | None:
        return self._bw_hi

    @property
    def inflight_hi(self) -> float | None:
        return self._inflight_hi

    def _state_name(self) -> str:
        return self.state.value

    def _bandwidth_estimate(self) -> float | None:
        return self._bw()

    # -- model ------------------------------------------------------------------------------------

    def _bw(self) -> float:
        bw = self._bw_filter.get()
        if self._bw_hi is not None and self._bw_hi < bw:
            return self._bw_hi
        return bw

    def _bdp(self, bw: float | None = None) -> float:
        rtt = self._model_min_rtt if self._model_min_rtt is not None else K_INITIAL_RTT
        return (self._bw() if bw is None else bw) * rtt

    def _probe_rtt_cwnd(self) -> int:
        return max(int(K_PROBE_RTT_CWND_GAIN * self._bdp()), K_MIN_CWND_PACKETS * self.max_datagram_size)

    # -- hooks ------------------------------------------------------------------------------------

    def _on_acked(self, *, now: float, packet: SentPacket, sample: RateSample) -> None:
        if self._win_start is None:
            self._win_start = packet.sent_time
        self._win_acked += packet.size
        self._win_packets += 1
        self._win_rtt_sum += sample.rtt
        self._win_rtt_n += 1
        inflight = self._bytes_in_flight + packet.size
        if inflight > self._win_inflight_max:
            self._win_inflight_max = inflight
        if sample.delivery_rate > 0 and (not sample.app_limited or sample.delivery_rate > self._bw_filter.get()):
            self._bw_filter.offer(sample.delivery_rate)
        self._update_min_rtt(now, sample.rtt)
        if not self._jumped and self.state is LtBbrState.STARTUP:
            self._observe_train(now, packet)
        self._update_ack_aggregation(now, packet.size)
        round_start = packet.delivered >= self._next_round_delivered
        if round_start:
            self._next_round_delivered = self._delivered
            self._round_count += 1
            self._bw_filter.end_round(self._round_count)
            self._extra_filter.end_round(self._round_count)
            self._on_round_end(now, sample)
        self._update_state(now, round_start)
        self._update_cwnd(packet.size)
        if not self._filled_pipe:
            self._startup_rate = max(self._startup_rate, self._pacing_gain * self._bw())

    def _on_lost(self, *, now: float, packets: list[SentPacket]) -> None:
        for packet in packets:
            self._win_lost += packet.size
            self._win_packets += 1

    def _on_persistent_congestion(self, *, now: float) -> None:
        # The path went away for several PTOs: what we knew about its bandwidth is stale. Restart
        # from STARTUP with a minimal window, keeping min_rtt.
        self._bw_filter.reset()
        self._extra_filter.reset()
        self._agg_start = None
        self._bw_hi = None
        self._inflight_hi = None
        self._full_bw = 0.0
        self._full_bw_count = 0
        self._filled_pipe = False
        self._startup_rate = 0.0
        self._jumped = True  # after an outage the path is unknown: no train, plain STARTUP
        self._enter_startup()
        self._cwnd = K_MIN_CWND_PACKETS * self.max_datagram_size
        self._reset_window(None)

    # -- per-ack machinery ------------------------------------------------------------------------

    def _observe_train(self, now: float, packet: SentPacket) -> None:
        """Rule 7: time the ACKs of one back-to-back flight; jump once it has spread enough."""
        if packet.delivered != self._train_mark:
            self._train_mark = packet.delivered
            self._train_first = now
            self._train_base = self._delivered  # this first ACK only starts the clock
            self._train_packets = 1
            return
        self._train_packets += 1
        span = now - self._train_first
        if self._train_packets < K_TRAIN_MIN_PACKETS or span < K_TRAIN_MIN_SPAN:
            return
        self.train_estimate = (self._delivered - self._train_base) / span
        self._jumped = True
        jump = K_JUMP_FRACTION * self.train_estimate
        if jump > self._bw():
            self._bw_filter.offer(jump)
            self._cwnd = max(self._cwnd, int(K_STARTUP_CWND_GAIN * self._bdp()))

    def _update_ack_aggregation(self, now: float, acked: int) -> None:
        # Acks arrive in bursts (receiver batching, host scheduling): without an allowance for the
        # burst, cwnd = 2 x bw x min_rtt starves the sender when min_rtt is small.
        bw = self._bw()
        if bw <= 0:
            return
        if self._agg_start is None:
            self._agg_start = now
        expected = bw * (now - self._agg_start)
        if self._agg_delivered <= expected:
            self._agg_start = now
            self._agg_delivered = 0
            expected = 0.0
        self._agg_delivered += acked
        extra = min(self._agg_delivered - expected, float(self._cwnd), bw * K_EXTRA_ACKED_MAX)
        self._extra_filter.offer(extra)

    def _update_min_rtt(self, now: float, rtt: float) -> None:
        expired = now > self._min_rtt_stamp + K_MIN_RTT_WINDOW
        if self._model_min_rtt is None or rtt <= self._model_min_rtt or expired:
            self._model_min_rtt = rtt
            self._min_rtt_stamp = now
        elif rtt <= self._model_min_rtt * (1 + K_MIN_RTT_TOLERANCE):
            # The queue was (nearly) empty just now: min_rtt is still valid; no need to probe.
            self._min_rtt_stamp = now
        if expired and self.state is not LtBbrState.PROBE_RTT and self._filled_pipe:
            self.state = LtBbrState.PROBE_RTT
            self._pacing_gain = 1.0
            self._probe_rtt_done = None

    def _on_round_end(self, now: float, sample: RateSample) -> None:
        if self.state is LtBbrState.STARTUP and not sample.app_limited:
            bw = self._bw_filter.get()
            if bw >= self._full_bw * K_FULL_BW_GROWTH:
                self._full_bw = bw
                self._full_bw_count = 0
            else:
                self._full_bw_count += 1
                if self._full_bw_count >= K_FULL_BW_ROUNDS:
                    self._filled_pipe = True
        if self._win_packets >= K_MIN_WINDOW_PACKETS:
            self._judge_window(now)
        if self.state is LtBbrState.PROBE_RTT and self._probe_rtt_done is not None:
            self._probe_rtt_round_done = True

    def _judge_window(self, now: float) -> None:
        n = self._win_packets
        total = self._win_acked + self._win_lost
        loss_rate = self._win_lost / total if total else 0.0
        min_rtt = self._model_min_rtt if self._model_min_rtt is not None else K_INITIAL_RTT
        mean_rtt = self._win_rtt_sum / self._win_rtt_n if self._win_rtt_n else min_rtt
        queue_delay = max(mean_rtt - min_rtt, 0.0)
        queue_high = queue_delay > max(K_QUEUE_RATIO * min_rtt, K_QUEUE_MIN_DELAY)
        base = self._loss_baseline
        p = max(base, K_LOSS_FLOOR)
        margin = max(K_LOSS_MARGIN, 3.0 * math.sqrt(p * (1.0 - p) / n))
        if loss_rate > K_PERSISTENT_LOSS:
            self._high_loss_windows += 1
        else:
            self._high_loss_windows = 0
        congested = (queue_high and loss_rate > base + margin) or self._high_loss_windows >= K_PERSISTENT_ROUNDS
        if not queue_high and not congested:
            self._baseline_windows += 1
            weight = 1.0 / min(self._baseline_windows, K_BASELINE_WINDOWS)
            self._loss_baseline += weight * (min(loss_rate, K_BASELINE_MAX) - base)
        self.windows_judged += 1
        self.last_window_loss = loss_rate
        self.last_window_queue_delay = queue_delay
        elapsed = now - self._win_start if self._win_start is not None else 0.0
        win_rate = self._win_acked / elapsed if elapsed > 0 else 0.0
        if congested:
            self._on_congestion(now, win_rate)
        else:
            # Additive in absolute terms (the same for every flow), doubling each clean window:
            # flows sharing a bottleneck converge towards equal shares, as with AIMD.
            step = self.max_datagram_size * (1 << min(self._clean_windows, K_BW_HI_GROWTH_MAX_EXP))
            if self._bw_hi is not None:
                self._bw_hi += step / min_rtt
                if self._bw_hi > K_BW_HI_RELEASE * self._bw_filter.get():
                    self._bw_hi = None
            if self._inflight_hi is not None and now >= self._inflight_hold_until:
                self._inflight_hi += step
                if self._inflight_hi > K_BW_HI_RELEASE * self._cwnd_target():
                    self._inflight_hi = None
            if self._bw_hi is not None or self._inflight_hi is not None:
                self._clean_windows += 1
            if (
                self.state is LtBbrState.STARTUP
                and queue_delay > max(K_STARTUP_QUEUE_RATIO * min_rtt, K_QUEUE_MIN_DELAY)
            ):
                # The pipe is full and a queue is building: stop before it overflows.
                self._filled_pipe = True
        self._reset_window(now)

    def _on_congestion(self, now: float, win_rate: float) -> None:
        self._count_congestion_event()
        self._high_loss_windows = 0
        self._clean_windows = 0
        # A window's delivered rate swings widely at short RTT: 38-123 Mbit/s across windows at
        # 20 ms / 100 Mbit/s, with a sender or receiver descheduled for a few ms of some windows.
        # Congestion that persists cuts again in the next window.
        cap = max(K_BETA * win_rate, K_BETA_FLOOR * self._bw())
        floor = K_MIN_CWND_PACKETS * self.max_datagram_size / (self._model_min_rtt or K_INITIAL_RTT)
        cap = max(cap, floor)
        self._bw_hi = cap if self._bw_hi is None else min(self._bw_hi, cap)
        volume = max(K_BETA * self._win_inflight_max, float(K_MIN_CWND_PACKETS * self.max_datagram_size))
        self._inflight_hi = volume if self._inflight_hi is None else min(self._inflight_hi, volume)
        self._inflight_hold_until = now + K_INFLIGHT_HOLD
        if self.state is LtBbrState.STARTUP:
            self._filled_pipe = True
        elif self.state is LtBbrState.PROBE_BW and K_PROBE_GAINS[self._cycle_index] > 1.0:
            self._cycle_index = 1
            self._pacing_gain = K_PROBE_GAINS[1]
            self._cycle_stamp = self._delivered_time

    def _reset_window(self, now: float | None) -> None:
        self._win_start = now
        self._win_acked = 0
        self._win_lost = 0
        self._win_packets = 0
        self._win_rtt_sum = 0.0
        self._win_rtt_n = 0
        self._win_inflight_max = 0

    def _enter_startup(self) -> None:
        self.state = LtBbrState.STARTUP
        self._pacing_gain = K_STARTUP_GAIN
        self._cwnd_gain = K_STARTUP_CWND_GAIN

    def _enter_probe_bw(self, now: float, index: int) -> None:
        self.state = LtBbrState.PROBE_BW
        self._cycle_index = index
        self._cycle_stamp = now
        self._pacing_gain = K_PROBE_GAINS[index]
        self._cwnd_gain = K_CWND_GAIN

    def _update_state(self, now: float, round_start: bool) -> None:
        state = self.state
        if state is LtBbrState.STARTUP:
            if self._filled_pipe:
                self.state = LtBbrState.DRAIN
                self._pacing_gain = K_DRAIN_GAIN
                self._cwnd_gain = K_STARTUP_CWND_GAIN
            return
        if state is LtBbrState.DRAIN:
            if self._bytes_in_flight <= self._bdp():
                self._enter_probe_bw(now, K_CRUISE_PHASE)
            return
        if state is LtBbrState.PROBE_BW:
            self._advance_cycle(now)
            return
        # PROBE_RTT
        if self._probe_rtt_done is None:
            if self._bytes_in_flight <= self._probe_rtt_cwnd():
                self._probe_rtt_done = now + K_PROBE_RTT_DURATION
                self._probe_rtt_round_done = False
                self._next_round_delivered = self._delivered
        elif self._probe_rtt_round_done and now >= self._probe_rtt_done:
            self._min_rtt_stamp = now
            if self._filled_pipe:
                self._enter_probe_bw(now, K_CRUISE_PHASE)
            else:
                self._enter_startup()

    def _advance_cycle(self, now: float) -> None:
        min_rtt = self._model_min_rtt if self._model_min_rtt is not None else K_INITIAL_RTT
        elapsed = now - self._cycle_stamp
        gain = K_PROBE_GAINS[self._cycle_index]
        if gain > 1.0:
            done = elapsed > min_rtt and (
                self._bytes_in_flight >= gain * self._bdp() or elapsed > 2 * min_rtt
            )
        elif gain < 1.0:
            done = elapsed > min_rtt or self._bytes_in_flight <= self._bdp()
        else:
            done = elapsed > min_rtt
        if done:
            index = (self._cycle_index + 1) % len(K_PROBE_GAINS)
            self._cycle_index = index
            self._cycle_stamp = now
            self._pacing_gain = K_PROBE_GAINS[index]

    def _update_cwnd(self, acked: int) -> None:
        # The aggregation allowance only once the pipe is full: in STARTUP the lagging bw estimate
        # makes every ack look "extra", and the 2 x BDP cap is what keeps STARTUP inside the queue.
        target = self._cwnd_target()
        bw = self._bw()
        if bw <= 0:
            self._cwnd += acked
        elif self._filled_pipe:
            self._cwnd = min(self._cwnd + acked, target)
        elif self._cwnd < target or self._delivered < K_INITIAL_WINDOW_PACKETS * self.max_datagram_size:
            self._cwnd += acked
        if self._inflight_hi is not None and self._cwnd > self._inflight_hi:
            self._cwnd = int(self._inflight_hi)
        self._cwnd = max(self._cwnd, K_MIN_CWND_PACKETS * self.max_datagram_size)

    def _cwnd_target(self) -> int:
        extra = self._extra_filter.get() if self._filled_pipe else 0.0
        return int(self._cwnd_gain * self._bdp() + extra) + 3 * self.max_datagram_size
