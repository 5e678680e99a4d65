"""The userspace emulator's pure core, in virtual time (no clock, no sockets)."""

from __future__ import annotations

import math

from fedgate.bench import DirectionShape, EmuDirection, default_queue_bytes


def _consistent(d: EmuDirection) -> None:
    s = d.stats()
    assert s.packets_in == s.packets_out + s.drop_loss + s.drop_queue + s.in_flight


def test_fixed_delay_without_rate() -> None:
    d = EmuDirection(DirectionShape(delay_s=0.020), seed=1)
    assert d.offer(b"x" * 100, now=1.0)
    assert d.next_due() == 1.020
    assert d.pop_due(now=1.0199) == []
    assert d.pop_due(now=1.020) == [b"x" * 100]
    assert d.next_due() is None
    s = d.stats()
    assert (s.packets_out, s.bytes_out, s.late_max_s) == (1, 100, 0.0)


def test_serialization_spaces_packets_at_the_rate() -> None:
    # 8000 bit/s = 1000 bytes/s: a 100-byte packet takes 0.1 s on the wire
    d = EmuDirection(DirectionShape(delay_s=0.5, rate_bps=8000, queue_bytes=10_000), seed=1)
    for _ in range(3):
        assert d.offer(bytes(100), now=0.0)
    dues = []
    while (due := d.next_due()) is not None:
        dues.append(due)
        d.pop_due(now=due)
    assert [round(t, 9) for t in dues] == [0.6, 0.7, 0.8]


def test_tail_drop_when_backlog_exceeds_queue() -> None:
    d = EmuDirection(DirectionShape(rate_bps=8000, queue_bytes=1500), seed=1)
    accepted = [d.offer(bytes(500), now=0.0) for _ in range(10)]
    # the backlog counts every byte not yet serialized, the packet on the wire included: 3 x 500 fit
    assert accepted == [True] * 3 + [False] * 7
    s = d.stats()
    assert s.drop_queue == 7 and s.drop_loss == 0
    assert 0 < s.queue_peak_bytes <= 1500
    # once the serializer has drained, packets are accepted again
    assert d.offer(bytes(500), now=10.0)
    _consistent(d)


def test_rate_is_respected_under_overload() -> None:
    rate = 1e6  # bit/s
    d = EmuDirection(DirectionShape(rate_bps=rate, queue_bytes=30_000), seed=1)
    delivered = 0
    t = 0.0
    while t < 2.0:  # offer 3 Mbit/s of 1250-byte packets for 2 s
        d.offer(bytes(1250), now=t)
        delivered += sum(len(p) for p in d.pop_due(now=t))
        t += 1250 * 8 / 3e6
    assert delivered * 8 <= rate * 2.0 + 1250 * 8
    assert delivered * 8 >= rate * 2.0 * 0.98
    assert d.stats().drop_queue > 0
    _consistent(d)


def test_random_loss_fraction_within_statistical_bounds() -> None:
    n, p = 200_000, 0.02
    d = EmuDirection(DirectionShape(loss=p), seed=7)
    for i in range(n):
        d.offer(b"x", now=i * 1e-6)
    drops = d.stats().drop_loss
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(drops - n * p) < 5 * sigma
    _consistent(d)


def test_loss_draws_are_reproducible_per_seed() -> None:
    def pattern(seed: int) -> list[bool]:
        d = EmuDirection(DirectionShape(loss=0.3), seed=seed)
        return [d.offer(b"x", now=0.0) for _ in range(200)]

    assert pattern(3) == pattern(3)
    assert pattern(3) != pattern(4)


def test_no_loss_setting_never_drops() -> None:
    d = EmuDirection(DirectionShape(), seed=1)
    assert all(d.offer(b"x", now=0.0) for _ in range(10_000))
    assert d.stats().drop_loss == 0


def test_reshape_keeps_accepted_packets_and_reset_zeroes_counters() -> None:
    d = EmuDirection(DirectionShape(delay_s=1.0), seed=1)
    d.offer(b"a", now=0.0)
    d.reshape(DirectionShape(delay_s=0.0))
    d.offer(b"b", now=0.0)
    assert d.pop_due(now=0.5) == []  # FIFO: b waits behind a (a link never reorders)
    assert d.pop_due(now=1.0) == [b"a", b"b"]
    d.reset_stats()
    s = d.stats()
    assert (s.packets_in, s.packets_out, s.late_max_s) == (0, 0, 0.0)


def test_lateness_is_counted() -> None:
    d = EmuDirection(DirectionShape(delay_s=0.010), seed=1)
    d.offer(b"a", now=0.0)
    d.pop_due(now=0.013)
    s = d.stats()
    assert math.isclose(s.late_max_s, 0.003) and math.isclose(s.late_sum_s, 0.003)


def test_a_tick_delivers_on_its_grid_and_keeps_the_mean_delay() -> None:
    tick, delay = 0.00025, 0.010
    # 100 Mbit/s, 1500-byte packets offered back to back: one leaves the serializer every 120 us
    d = EmuDirection(DirectionShape(delay_s=delay, rate_bps=100e6, queue_bytes=10_000_000, tick_s=tick), seed=1)
    exact = EmuDirection(DirectionShape(delay_s=delay, rate_bps=100e6, queue_bytes=10_000_000), seed=1)
    for i in range(5000):
        assert d.offer(bytes(1500), now=1.0 + i * 0.00012)
        assert exact.offer(bytes(1500), now=1.0 + i * 0.00012)
    dues: list[float] = []  # one per packet, in delivery order
    while (due := d.next_due()) is not None:
        dues += [due] * len(d.pop_due(now=due))
    ideals: list[float] = []
    while (ideal := exact.next_due()) is not None:
        ideals += [ideal] * len(exact.pop_due(now=ideal))
    assert len(dues) == len(ideals) == 5000
    errors = [due - ideal for due, ideal in zip(dues, ideals, strict=True)]
    assert dues == sorted(dues)
    assert all(math.isclose(t / tick, round(t / tick), abs_tol=1e-6) for t in dues)
    assert max(abs(e) for e in errors) <= tick / 2 + 1e-9
    # the mean delay is kept: the rounding errors average out
    assert abs(sum(errors) / len(errors)) < tick / 20
    # packets due within one tick leave together: fewer wake-ups than packets
    assert len(set(dues)) < 0.6 * len(dues)
    assert d.stats().late_max_s == 0.0  # lateness counts from the tick


def test_no_tick_delivers_each_packet_when_due() -> None:
    d = EmuDirection(DirectionShape(delay_s=0.010, rate_bps=100e6, queue_bytes=10_000_000), seed=1)
    for i in range(3):
        d.offer(bytes(1500), now=1.0 + i * 0.00012)
    dues = []
    while (due := d.next_due()) is not None:
        dues.append(due)
        d.pop_due(now=due)
    assert [round(t, 9) for t in dues] == [1.01012, 1.01024, 1.01036]


def test_default_queue_is_one_bdp_with_a_floor() -> None:
    assert default_queue_bytes(100e6, 0.08) == 1_000_000
    assert default_queue_bytes(100e6, 0.08, bdp_multiple=2) == 2_000_000
    assert default_queue_bytes(1e6, 0.001) == 64 * 1500
