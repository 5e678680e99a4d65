"""LT-BBR's STARTUP (rule 7 of ``_ltbbr``): the first flight is a packet train and the model jumps."""

from __future__ import annotations

import pytest

from fedgate.congestion import LtBbr, LtBbrState
from fedgate.congestion._ltbbr import K_INITIAL_WINDOW_PACKETS, K_JUMP_FRACTION
from tests.congestion.helpers import limit, run_single

MDS = 1200


def _flight(cc: LtBbr, *, sent_at: float, ack_at: list[float]) -> None:
    """Send one back-to-back flight at ``sent_at``; ACK packet k at ``ack_at[k]``."""
    for k in range(len(ack_at)):
        cc.on_packet_sent(now=sent_at, packet_id=k, size=MDS)
    for k, at in enumerate(ack_at):
        cc.on_packet_acked(now=at, packet_id=k)


def test_first_flight_is_unpaced_and_sized_to_the_initial_window() -> None:
    cc = LtBbr(max_datagram_size=MDS)
    assert cc.pacing_rate is None
    assert cc.congestion_window == K_INITIAL_WINDOW_PACKETS * MDS


def test_ack_spacing_of_the_first_flight_measures_the_bottleneck() -> None:
    cc = LtBbr(max_datagram_size=MDS)
    spacing = 0.0002  # the bottleneck releases one 1200-byte packet per 200 us: 6 MB/s
    _flight(cc, sent_at=0.0, ack_at=[0.3 + k * spacing for k in range(K_INITIAL_WINDOW_PACKETS)])
    assert cc.train_estimate == pytest.approx(MDS / spacing, rel=0.05)
    bw = cc.statistics().bandwidth_estimate
    assert bw is not None and bw >= 0.95 * K_JUMP_FRACTION * MDS / spacing
    # the window jumped with it: two BDPs of the jumped rate at a 0.3 s round trip
    assert cc.congestion_window >= 0.95 * 2 * K_JUMP_FRACTION * (MDS / spacing) * 0.3
    assert cc.state is LtBbrState.STARTUP


def test_compressed_acks_make_no_estimate() -> None:
    # Every ACK at the same instant (ACK compression, a fast link): the spread tells nothing.
    cc = LtBbr(max_datagram_size=MDS)
    _flight(cc, sent_at=0.0, ack_at=[0.3 + k * 1e-6 for k in range(K_INITIAL_WINDOW_PACKETS)])
    assert cc.train_estimate is None
    assert cc.congestion_window <= 2 * K_INITIAL_WINDOW_PACKETS * MDS


def test_a_short_train_makes_no_estimate() -> None:
    cc = LtBbr(max_datagram_size=MDS)
    _flight(cc, sent_at=0.0, ack_at=[0.3 + k * 0.001 for k in range(4)])
    assert cc.train_estimate is None


@pytest.mark.parametrize("rtt", [0.08, 0.32])
def test_startup_reaches_the_bottleneck_within_a_few_round_trips(rtt: float) -> None:
    # Doubling from the initial window would need log2(BDP / 32 packets) round trips; the jump
    # needs about three, whatever the BDP.
    link, result = run_single(LtBbr, rtt=rtt, duration=4.0, rate_bps=100e6)
    first_second = result.flows[0].goodput(0.0, 1.0) if rtt < 0.1 else result.flows[0].goodput(1.0, 2.0)
    assert first_second >= 0.7 * limit(link)
    assert result.overflow_fraction < 0.005
