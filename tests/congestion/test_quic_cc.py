"""Our controller and pacer inside real aioquic connections, driven in virtual time (no sockets)."""

from __future__ import annotations

import heapq
import ssl
from types import SimpleNamespace
from typing import Any

import pytest
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from fedgate.congestion import LtBbr, NewReno
from fedgate.congestion._quic_cc import AioquicController, AioquicPacer, install
from fedgate.congestion._quic_tls import self_signed

MDS = 1452
CLIENT = ("10.0.0.1", 4433)
SERVER = ("10.0.0.2", 4433)
K_WINDOW = 32 * 1024 * 1024  # bytes of flow-control window


def _pair() -> tuple[QuicConnection, QuicConnection]:
    common: dict[str, Any] = {
        "alpn_protocols": ["test"],
        "max_datagram_size": MDS,
        "max_data": K_WINDOW,
        "max_stream_data": K_WINDOW,
    }
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE, **common))
    server_cfg = QuicConfiguration(is_client=False, **common)
    server_cfg.certificate, server_cfg.private_key = self_signed()
    server = QuicConnection(
        configuration=server_cfg, original_destination_connection_id=client.original_destination_connection_id
    )
    return client, server


def _transfer(
    client: QuicConnection, server: QuicConnection, *, rate: float, rtt: float, seconds: float
) -> tuple[int, list[float]]:
    """Bulk client -> server over a rate-limited path in virtual time; (bytes received, send times)."""
    heap: list[tuple[float, int, int, bytes]] = []
    busy = [0.0, 0.0]
    seq = 0
    now = 0.0
    received = 0
    send_times: list[float] = []
    client.connect(SERVER, now=now)
    ends = (client, server)
    heard = [False]
    started = False
    while now < seconds:
        for side, conn in enumerate(ends):
            if side == 1 and not heard[0]:
                continue  # a server has no network path before its first datagram
            for data, _addr in conn.datagrams_to_send(now=now):
                if side == 0 and started:
                    send_times.append(now)
                depart = max(now, busy[side]) + len(data) / rate
                busy[side] = depart
                seq += 1
                heapq.heappush(heap, (depart + rtt / 2, seq, 1 - side, data))
        timers = [t for t in (client.get_timer(), server.get_timer() if heard[0] else None) if t is not None]
        candidates = timers + ([heap[0][0]] if heap else [])
        # aioquic sends a due ACK only once its time has strictly passed: step past a timer equal to now
        now = max(now + 1e-5, min(candidates))
        while heap and heap[0][0] <= now:
            _, _, dest, data = heapq.heappop(heap)
            ends[dest].receive_datagram(data, CLIENT if dest == 1 else SERVER, now=now)
            heard[0] = heard[0] or dest == 1
        for conn in ends if heard[0] else ends[:1]:
            timer = conn.get_timer()
            if timer is not None and timer <= now:
                conn.handle_timer(now=now)
        for conn in ends:
            event = conn.next_event()
            while event is not None:
                if isinstance(event, events.HandshakeCompleted) and conn is client and not started:
                    started = True
                    client.send_stream_data(0, bytes(24 * 1024 * 1024))
                elif isinstance(event, events.StreamDataReceived) and conn is server:
                    received += len(event.data)
                event = conn.next_event()
    return received, send_times


def test_ltbbr_drives_a_real_connection_to_the_path_rate() -> None:
    client, server = _pair()
    cc = install(client, LtBbr(max_datagram_size=MDS), bucket_s=0.004)
    install(server, LtBbr(max_datagram_size=MDS), bucket_s=0.004)
    assert isinstance(client._loss._pacer, AioquicPacer)
    assert client._loss._cc is cc
    rate = 1.25e6  # bytes per second (10 Mbit/s)
    received, send_times = _transfer(client, server, rate=rate, rtt=0.04, seconds=4.0)
    stats = cc.controller.statistics()
    assert stats.state == "probe_bw"
    assert stats.bandwidth_estimate is not None
    assert stats.bandwidth_estimate == pytest.approx(rate, rel=0.15)
    assert stats.min_rtt is not None and stats.min_rtt == pytest.approx(0.04, rel=0.2)
    assert received >= 0.7 * rate * 4.0  # startup and handshake included
    # aioquic's controller view follows ours
    assert cc.congestion_window == cc.controller.congestion_window
    assert cc.bytes_in_flight == cc.controller.bytes_in_flight
    # paced: no more than a bucket's worth of datagrams leaves at one instant
    burst = max(send_times.count(t) for t in set(send_times[len(send_times) // 2 :]))
    assert burst <= 0.004 * 1.25 * rate / MDS + 3


def test_newreno_plugs_in_the_same_way() -> None:
    client, server = _pair()
    cc = install(client, NewReno(max_datagram_size=MDS), bucket_s=0.004)
    received, _ = _transfer(client, server, rate=2.5e6, rtt=0.02, seconds=2.0)
    assert received > 1_000_000
    assert cc.controller.statistics().name == "newreno"
    assert cc.get_log_data()["cwnd"] == cc.controller.congestion_window


def test_install_refuses_unknown_aioquic_internals() -> None:
    with pytest.raises(RuntimeError, match="unsupported aioquic"):
        install(SimpleNamespace(), LtBbr(max_datagram_size=MDS), bucket_s=0.004)  # type: ignore[arg-type]


def test_install_refuses_a_connection_that_already_sent() -> None:
    client, _server = _pair()
    client.connect(SERVER, now=0.0)
    client.datagrams_to_send(now=0.0)
    with pytest.raises(RuntimeError, match="before the connection sends"):
        install(client, LtBbr(max_datagram_size=MDS), bucket_s=0.004)


def test_adapter_keeps_packet_number_spaces_apart() -> None:
    adapter = AioquicController(LtBbr(max_datagram_size=MDS))

    def packet(epoch: Epoch, number: int) -> QuicSentPacket:
        return QuicSentPacket(
            epoch=epoch,
            in_flight=True,
            is_ack_eliciting=True,
            is_crypto_packet=False,
            packet_number=number,
            packet_type=QuicPacketType.ONE_RTT,
            sent_time=0.0,
            sent_bytes=1000,
        )

    initial, handshake, app = packet(Epoch.INITIAL, 0), packet(Epoch.HANDSHAKE, 0), packet(Epoch.ONE_RTT, 0)
    for p in (initial, handshake, app):
        adapter.on_packet_sent(packet=p)
    assert adapter.bytes_in_flight == 3000
    adapter.on_packet_acked(now=0.05, packet=handshake)
    adapter.on_packets_lost(now=0.06, packets=[app])
    assert adapter.bytes_in_flight == 1000
    adapter.on_packets_expired(packets=[initial])
    assert adapter.bytes_in_flight == 0
    assert adapter.controller.statistics().packets_lost == 1


def test_pacer_bucket_grows_with_min_rtt_on_long_paths() -> None:
    # A late event loop loses the tokens beyond the bucket: on a 320 ms path the bucket holds 20 ms.
    from fedgate.congestion import Pacer
    from fedgate.congestion._quic_cc import K_BUCKET_MAX

    def capacity_after(rtt: float) -> float:
        controller: Any = SimpleNamespace(min_rtt=rtt, pacing_rate=12.5e6, max_datagram_size=1200)
        pacer = Pacer(max_datagram_size=1200, bucket_s=0.004)
        AioquicPacer(controller, pacer, bucket_s=0.004).next_send_time(1.0)
        return pacer.capacity / 12.5e6

    assert capacity_after(0.02) == pytest.approx(0.004)
    assert capacity_after(0.16) == pytest.approx(0.01)
    assert capacity_after(0.32) == pytest.approx(K_BUCKET_MAX)
