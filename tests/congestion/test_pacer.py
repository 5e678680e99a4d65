"""The token-bucket pacer, in virtual time."""

from __future__ import annotations

import pytest

from fedgate.congestion import Pacer

MDS = 1200


def _drain(pacer: Pacer, *, start: float, end: float, granularity: float) -> int:
    """Send as a timer-driven loop with ``granularity`` seconds between wakeups would; bytes sent."""
    now = start
    sent = 0
    while now < end:
        while pacer.next_send_time(now=now) is None:
            pacer.on_sent(now=now, size=MDS)
            sent += MDS
        now += granularity
    return sent


def test_unpaced_releases_everything() -> None:
    pacer = Pacer(max_datagram_size=MDS)
    assert pacer.next_send_time(now=0.0) is None
    pacer.on_sent(now=0.0, size=MDS)
    assert pacer.next_send_time(now=0.0) is None


@pytest.mark.parametrize("granularity", [0.0001, 0.001, 0.0015])
def test_rate_holds_with_coarse_timers(granularity: float) -> None:
    rate = 12.5e6  # 100 Mbit/s in bytes per second
    pacer = Pacer(max_datagram_size=MDS, bucket_s=0.004)
    pacer.set_rate(rate, now=0.0)
    sent = _drain(pacer, start=0.0, end=1.0, granularity=granularity)
    assert sent == pytest.approx(rate, rel=0.02)


def test_small_bucket_caps_rate_under_coarse_timers() -> None:
    # Why the bucket must hold >= ~2 ms: with a two-packet bucket and 1 ms wakeups, 100 Mbit/s is unreachable.
    pacer = Pacer(max_datagram_size=MDS, bucket_s=1e-6)
    pacer.set_rate(12.5e6, now=0.0)
    sent = _drain(pacer, start=0.0, end=1.0, granularity=0.001)
    assert sent < 0.5 * 12.5e6


def test_next_send_time_is_in_the_future_when_empty() -> None:
    pacer = Pacer(max_datagram_size=MDS, bucket_s=0.002)
    pacer.set_rate(1e6, now=0.0)
    while pacer.next_send_time(now=0.0) is None:
        pacer.on_sent(now=0.0, size=MDS)
    at = pacer.next_send_time(now=0.0)
    assert at is not None and 0.0 < at <= 2 * MDS / 1e6
    assert pacer.next_send_time(now=at) is None
    assert pacer.capacity >= 0.002 * 1e6


def test_bad_bucket_rejected() -> None:
    with pytest.raises(ValueError):
        Pacer(max_datagram_size=MDS, bucket_s=0)


def _wakeups(pacer: Pacer, *, end: float) -> tuple[int, int]:
    """Drive the pacer the way the event loop does (sleep exactly until next_send_time); (wakeups, bytes)."""
    now, wakeups, sent = 0.0, 0, 0
    while now < end:
        while (at := pacer.next_send_time(now=now)) is None:
            pacer.on_sent(now=now, size=MDS)
            sent += MDS
        now = at
        wakeups += 1
    return wakeups, sent


def test_one_wakeup_per_quantum_not_per_datagram() -> None:
    rate = 12.5e6  # 100 Mbit/s: 10,400 datagrams of 1200 bytes per second
    pacer = Pacer(max_datagram_size=MDS, bucket_s=0.004, quantum_s=0.001)
    pacer.set_rate(rate, now=0.0)
    wakeups, sent = _wakeups(pacer, end=1.0)
    assert sent == pytest.approx(rate, rel=0.02)
    assert wakeups <= 1100


def test_zero_quantum_wakes_per_datagram() -> None:
    rate = 12.5e6
    pacer = Pacer(max_datagram_size=MDS, bucket_s=0.004, quantum_s=0.0)
    pacer.set_rate(rate, now=0.0)
    wakeups, _ = _wakeups(pacer, end=1.0)
    assert wakeups > 9000


def test_quantum_never_exceeds_the_bucket() -> None:
    pacer = Pacer(max_datagram_size=MDS, bucket_s=0.002, quantum_s=0.5)
    pacer.set_rate(1e6, now=0.0)
    while pacer.next_send_time(now=0.0) is None:
        pacer.on_sent(now=0.0, size=MDS)
    at = pacer.next_send_time(now=0.0)
    assert at is not None and at <= (pacer.capacity + MDS) / 1e6
