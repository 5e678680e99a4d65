"""One conformance suite, run against every registered congestion controller."""

from __future__ import annotations

import pytest

from fedgate.congestion import K_CONTROLLERS, CongestionController, CongestionControllerFactory
from fedgate.congestion.sim import FlowSpec, LinkSpec, Simulation
from tests.congestion.helpers import limit, run_single

NAMES = sorted(K_CONTROLLERS)
MDS = 1200


@pytest.fixture(params=NAMES)
def factory(request: pytest.FixtureRequest) -> CongestionControllerFactory:
    return K_CONTROLLERS[request.param]


def test_bytes_in_flight_accounting(factory: CongestionControllerFactory) -> None:
    cc = factory(max_datagram_size=MDS)
    for i in range(6):
        cc.on_packet_sent(now=0.001 * i, packet_id=i, size=MDS)
    assert cc.bytes_in_flight == 6 * MDS
    cc.on_packet_acked(now=0.05, packet_id=0)
    cc.on_packet_acked(now=0.05, packet_id=0)  # duplicate: ignored
    cc.on_packet_acked(now=0.05, packet_id=99)  # unknown: ignored
    cc.on_packets_lost(now=0.06, packet_ids=[1, 2])
    cc.on_packets_discarded(packet_ids=[3])
    assert cc.bytes_in_flight == 2 * MDS
    cc.on_packet_acked(now=0.07, packet_id=4)
    cc.on_packet_acked(now=0.07, packet_id=5)
    assert cc.bytes_in_flight == 0
    stats = cc.statistics()
    assert stats.packets_sent == 6
    assert stats.packets_acked == 3
    assert stats.packets_lost == 2
    assert stats.delivered_bytes == 3 * MDS
    assert stats.lost_bytes == 2 * MDS
    assert stats.min_rtt is not None and stats.min_rtt == pytest.approx(0.05)


def test_initial_window_allows_sending(factory: CongestionControllerFactory) -> None:
    cc = factory(max_datagram_size=MDS)
    assert cc.can_send(MDS)
    assert cc.congestion_window >= 2 * MDS
    rate = cc.pacing_rate
    assert rate is None or rate > 0


def test_rejects_bad_datagram_size(factory: CongestionControllerFactory) -> None:
    with pytest.raises(ValueError):
        factory(max_datagram_size=0)


def test_window_never_below_minimum_under_heavy_loss(factory: CongestionControllerFactory) -> None:
    cc = factory(max_datagram_size=MDS)
    now = 0.0
    pid = 0
    for _ in range(50):
        ids = []
        while cc.can_send(MDS):
            cc.on_packet_sent(now=now, packet_id=pid, size=MDS)
            ids.append(pid)
            pid += 1
        now += 0.05
        cc.on_packet_acked(now=now, packet_id=ids[0])
        cc.on_packets_lost(now=now, packet_ids=ids[1:])
        assert cc.congestion_window >= 2 * MDS
        assert cc.bytes_in_flight == 0
    cc.on_persistent_congestion(now=now)
    assert cc.can_send(MDS)


@pytest.mark.parametrize("rtt", [0.02, 0.08])
def test_converges_to_bottleneck_rate(factory: CongestionControllerFactory, rtt: float) -> None:
    link, result = run_single(factory, rtt=rtt, duration=20.0)
    goodput = result.flows[0].goodput(10.0, 20.0)
    assert goodput >= 0.85 * limit(link), goodput / limit(link)
    # never more than the bottleneck can carry
    assert goodput <= 1.01 * link.rate


def test_keeps_queue_bounded(factory: CongestionControllerFactory) -> None:
    link, result = run_single(factory, rtt=0.08, duration=20.0)
    assert result.max_queue_bytes <= link.queue_limit
    assert result.overflow_fraction < 0.01


def test_survives_random_loss(factory: CongestionControllerFactory) -> None:
    # Every controller keeps delivering under 10% random loss; how much is controller-specific.
    _link, result = run_single(factory, rtt=0.04, loss=0.10, duration=10.0)
    flow = result.flows[0]
    assert all(second > 0 for second in flow.acked_per_second[1:10])
    assert result.controllers[0].bytes_in_flight >= 0


def test_recovers_after_persistent_congestion(factory: CongestionControllerFactory) -> None:
    link = LinkSpec(rate_bps=10e6, rtt=0.04)
    sim = Simulation(link, [FlowSpec(controller=factory)], seed=2)
    result = sim.run(5.0)
    cc: CongestionController = result.controllers[0]
    cc.on_persistent_congestion(now=5.0)
    result = sim.run(15.0)
    assert result.flows[0].goodput(12.0, 15.0) >= 0.8 * limit(link)


def test_deterministic(factory: CongestionControllerFactory) -> None:
    _, first = run_single(factory, rtt=0.04, loss=0.02, duration=5.0, seed=7)
    _, second = run_single(factory, rtt=0.04, loss=0.02, duration=5.0, seed=7)
    assert first.flows[0].acked_per_second == second.flows[0].acked_per_second


def test_statistics_snapshot_is_frozen(factory: CongestionControllerFactory) -> None:
    cc = factory(max_datagram_size=MDS)
    stats = cc.statistics()
    with pytest.raises(AttributeError):
        stats.congestion_window = 1  # type: ignore[misc]
    assert stats.name in K_CONTROLLERS
