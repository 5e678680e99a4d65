"""LT-BBR scenarios in virtual time: loss tolerance, back-off on real congestion, sharing."""

from __future__ import annotations

import pytest

from fedgate.congestion import LtBbr, LtBbrState, NewReno
from fedgate.congestion.sim import FlowSpec, LinkSpec, Simulation
from tests.congestion.helpers import limit, run_single

MDS = 1200


@pytest.mark.parametrize(
    ("rtt", "loss", "share"),
    [(0.08, 0.01, 0.95), (0.16, 0.02, 0.93), (0.32, 0.04, 0.90), (0.32, 0.10, 0.88)],
)
def test_wan_rows_reach_physical_limit(rtt: float, loss: float, share: float) -> None:
    # 30 s including startup, like the benchmark rows (at a 10 Mbit/s bottleneck to keep it fast).
    link, result = run_single(LtBbr, rtt=rtt, loss=loss, duration=30.0)
    goodput = result.flows[0].goodput(0.0, 30.0)
    assert goodput >= share * limit(link), goodput / limit(link)
    assert result.overflow_fraction < 0.01


def test_newreno_collapses_where_ltbbr_does_not() -> None:
    link, reno = run_single(NewReno, rtt=0.08, loss=0.01, duration=20.0)
    _, ours = run_single(LtBbr, rtt=0.08, loss=0.01, duration=20.0)
    assert reno.flows[0].goodput(10, 20) < 0.5 * limit(link)
    assert ours.flows[0].goodput(10, 20) > 0.95 * limit(link)


def test_random_loss_is_learned_as_baseline_not_congestion() -> None:
    _link, result = run_single(LtBbr, rtt=0.08, loss=0.10, duration=20.0)
    cc = result.controllers[0]
    assert isinstance(cc, LtBbr)
    assert cc.loss_baseline == pytest.approx(0.10, abs=0.03)
    assert cc.statistics().congestion_events == 0
    assert cc.state is LtBbrState.PROBE_BW


def test_startup_does_not_overflow_one_bdp_queue() -> None:
    for rtt in (0.02, 0.08, 0.32):
        _link, result = run_single(LtBbr, rtt=rtt, duration=8.0)
        flow = result.flows[0]
        assert flow.overflow_drops <= 0.005 * flow.packets_sent, (rtt, flow.overflow_drops)


def test_persistent_high_loss_backs_off() -> None:
    # 30% loss is far above the persistent threshold: the controller must yield, not blast.
    link, result = run_single(LtBbr, rtt=0.08, loss=0.30, duration=10.0)
    cc = result.controllers[0]
    assert cc.statistics().congestion_events >= 1
    assert result.flows[0].goodput(5, 10) < 0.5 * limit(link)


def test_loss_with_rising_queue_is_congestion() -> None:
    # Explicit events: a clean round teaches min_rtt and a 0% baseline, then a round whose RTTs
    # carry a full BDP of queueing delay loses 10% of its packets.
    cc = LtBbr(max_datagram_size=MDS)
    now = 0.0
    pid = 0
    for _round in range(6):
        ids = []
        for _ in range(40):
            cc.on_packet_sent(now=now, packet_id=pid, size=MDS)
            ids.append(pid)
            pid += 1
        for i in ids:
            cc.on_packet_acked(now=now + 0.1, packet_id=i)
        now += 0.1
    assert cc.statistics().congestion_events == 0
    before = cc.pacing_rate
    assert before is not None
    for _round in range(2):
        ids = []
        for _ in range(40):
            cc.on_packet_sent(now=now, packet_id=pid, size=MDS)
            ids.append(pid)
            pid += 1
        cc.on_packets_lost(now=now + 0.15, packet_ids=ids[:4])
        for i in ids[4:]:
            cc.on_packet_acked(now=now + 0.2, packet_id=i)
        now += 0.2
    assert cc.statistics().congestion_events >= 1
    assert cc.bw_hi is not None
    after = cc.pacing_rate
    assert after is not None and after < before


def _round(cc: LtBbr, now: float, first_id: int, *, rtt: float, lost: int = 0, packets: int = 40) -> int:
    """Send ``packets`` at ``now``; lose the first ``lost`` at half the RTT, ack the rest at ``now + rtt``."""
    ids = list(range(first_id, first_id + packets))
    for pid in ids:
        cc.on_packet_sent(now=now, packet_id=pid, size=MDS)
    if lost:
        cc.on_packets_lost(now=now + rtt / 2, packet_ids=ids[:lost])
    for pid in ids[lost:]:
        cc.on_packet_acked(now=now + rtt, packet_id=pid)
    return first_id + packets


def test_a_congestion_event_caps_rate_and_volume_then_recovers() -> None:
    cc = LtBbr(max_datagram_size=MDS)
    now, pid = 0.0, 0
    for _ in range(6):
        pid = _round(cc, now, pid, rtt=0.1)
        now += 0.1
    model = cc.statistics().bandwidth_estimate
    assert model is not None and cc.bw_hi is None and cc.inflight_hi is None
    # A round that loses 10% with a long queue, and whose ACKs come 2 s late: the window's delivered
    # rate is a twentieth of the model's.
    pid = _round(cc, now, pid, rtt=2.0, lost=4)
    now += 2.0
    assert cc.statistics().congestion_events == 1
    assert cc.bw_hi is not None
    assert 0.7 * model <= cc.bw_hi < model  # one event cuts at most 30%, however short the window
    volume = cc.inflight_hi
    assert volume is not None
    assert 0.85 * 36 * MDS <= volume <= 0.85 * 40 * MDS  # 36 to 40 packets were in flight in that window
    assert cc.congestion_window <= volume
    for _ in range(15):  # 1.5 s of clean rounds: the rate recovers, the volume holds
        pid = _round(cc, now, pid, rtt=0.1)
        now += 0.1
    assert cc.bw_hi is None or cc.bw_hi > 0.7 * model
    assert cc.inflight_hi == volume
    assert cc.congestion_window <= volume
    for _ in range(25):  # 2.5 s more: the hold is over, the volume grows and is released
        pid = _round(cc, now, pid, rtt=0.1)
        now += 0.1
    assert cc.inflight_hi is None
    assert cc.statistics().congestion_events == 1


def test_yields_to_a_second_flow() -> None:
    link = LinkSpec(rate_bps=10e6, rtt=0.08)
    flows = [FlowSpec(controller=LtBbr), FlowSpec(controller=LtBbr, start=10.0)]
    result = Simulation(link, flows, seed=5).run(50.0)
    first, second = result.flows
    total = first.goodput(30, 50) + second.goodput(30, 50)
    assert total >= 0.9 * limit(link)
    assert second.goodput(30, 50) >= 0.3 * total
    assert first.goodput(30, 50) >= 0.3 * total
    assert result.overflow_fraction < 0.02


def test_probe_rtt_refreshes_min_rtt_after_path_change() -> None:
    # The RTT grows from 40 ms to 80 ms; min_rtt must follow within the filter window.
    link = LinkSpec(rate_bps=10e6, rtt=0.04)
    sim = Simulation(link, [FlowSpec(controller=LtBbr)], seed=3)
    result = sim.run(5.0)
    sim.link = LinkSpec(rate_bps=10e6, rtt=0.08)
    result = sim.run(25.0)
    cc = result.controllers[0]
    assert isinstance(cc, LtBbr)
    assert cc.statistics().min_rtt is not None
    assert result.flows[0].goodput(20, 25) >= 0.85 * limit(link)


def test_ack_aggregation_does_not_starve_a_short_path() -> None:
    # A 2 ms path whose acks come back in 10 ms bursts (receiver batching, busy hosts): a window of
    # 2 x bw x min_rtt would starve the sender; the aggregation allowance covers the bursts.
    link = LinkSpec(rate_bps=10e6, rtt=0.002, ack_burst=0.01, queue_bytes=64_000)
    result = Simulation(link, [FlowSpec(controller=LtBbr)], seed=4).run(10.0)
    assert result.flows[0].goodput(5, 10) >= 0.8 * limit(link)
    assert result.overflow_fraction < 0.01
