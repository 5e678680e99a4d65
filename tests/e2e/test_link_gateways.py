"""Store-and-forward between two gateways over the fedgate link: TCP and QUIC, plain and mTLS."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import pytest

from fedgate.proxy.certs import issue_party, load_or_create_ca
from fedgate.proxy.osx_client import OsxQueueClient
from tests.proxy.gateways import (
    GatewayProcess,
    build,
    doctor,
    free_port,
    front_of,
    gateway_data,
    processes,
    running,
)

SESSION = "202611270000"
TOPIC = f"{SESSION}-guest-9999-host-10000-w"


def link_port(data: dict[str, Any]) -> int:
    return int(data["link"]["listen"].rsplit(":", 1)[1])


def pair(tmp_path: pathlib.Path, transport: str, *, tls: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    extra: dict[str, dict[str, Any]] = {}
    tls_of: dict[str, dict[str, Any]] = {}
    if tls:
        ca = load_or_create_ca(tmp_path / "certs")
        for party in ("9999", "10000"):
            cert, key = issue_party(tmp_path / "certs", party, ca=ca)
            tls_of[party] = {"ca_file": str(tmp_path / "certs" / "ca.pem"), "cert_file": str(cert),
                             "key_file": str(key)}
    b = gateway_data(tmp_path, "10000", {"9999": {"default": [{"ip": "127.0.0.1", "port": 1, "transport": transport}]}},
                     **({"tls": tls_of["10000"], "link": {"insecure": False}} if tls else extra))
    a = gateway_data(tmp_path, "9999", {"10000": {"default": [
        {"ip": "127.0.0.1", "port": link_port(b), "transport": transport}]}},
        **({"tls": tls_of["9999"], "link": {"insecure": False}} if tls else extra))
    return a, b


async def exchange(a: dict[str, Any], b: dict[str, Any], count: int, size: int) -> list[bytes]:
    pusher = OsxQueueClient(f"127.0.0.1:{front_of(a)}", party="9999")
    popper = OsxQueueClient(f"127.0.0.1:{front_of(b)}", party="10000")
    sent = [bytes([i % 251]) * size + b"%d" % i for i in range(count)]
    for payload in sent:
        await pusher.push(session=SESSION, topic=TOPIC, target="10000", payload=payload)
    got: list[bytes] = []
    for _ in sent:
        popped = await popper.pop(session=SESSION, topic=TOPIC, timeout=30)
        assert popped is not None, "a message did not arrive"
        got.append(popped)
    extra = await popper.pop(session=SESSION, topic=TOPIC, timeout=0.3)
    assert extra is None  # exactly once
    await pusher.aclose()
    await popper.aclose()
    assert got == sent  # in order
    return got


@pytest.mark.parametrize(("transport", "tls"), [("tcp", False), ("tcp", True), ("quic", True)],
                         ids=["tcp-plain", "tcp-mtls", "quic-mtls"])
def test_messages_cross_the_link_exactly_once_in_order(tmp_path: pathlib.Path, transport: str, tls: bool) -> None:
    a, b = pair(tmp_path, transport, tls=tls)

    async def main() -> None:
        async with running(build(b)) as gb, running(build(a)) as ga:
            await exchange(a, b, 30, 50_000)
            await exchange(a, b, 3, 3 * 1024 * 1024)  # several link chunks each
            assert ga.links is not None and gb.links is not None
            stats = ga.links.sender_statistics()["10000"]
            assert stats.connected and stats.messages_acked == 33
            listener = gb.links.listener_statistics()
            assert listener is not None and listener.messages_stored == 33

    asyncio.run(main())


@pytest.mark.parametrize(("transport", "tls", "workers"), [("tcp", False, 0), ("quic", True, 0), ("quic", True, 2)],
                         ids=["tcp-plain", "quic-mtls", "quic-mtls-2-worker-processes"])
def test_lanes_carry_a_peers_topics_side_by_side_each_in_order(
    tmp_path: pathlib.Path, transport: str, tls: bool, workers: int
) -> None:
    a, b = pair(tmp_path, transport, tls=tls)
    a["link"]["lanes_per_peer"] = 3
    if workers:
        a["quic"] = b["quic"] = {"workers": workers}
    topics = [f"{SESSION}-guest-9999-host-10000-t{i}" for i in range(9)]

    async def main() -> None:
        async with running(build(b)) as gb, running(build(a)) as ga:
            pusher = OsxQueueClient(f"127.0.0.1:{front_of(a)}", party="9999")
            popper = OsxQueueClient(f"127.0.0.1:{front_of(b)}", party="10000")
            sent: dict[str, list[bytes]] = {t: [] for t in topics}
            for i in range(90):
                topic = topics[i % len(topics)]
                payload = b"%d" % i * (1 + (i % 7) * 3000)
                sent[topic].append(payload)
                await pusher.push(session=SESSION, topic=topic, target="10000", payload=payload)
            for topic in topics:
                got = [await popper.pop(session=SESSION, topic=topic, timeout=30) for _ in sent[topic]]
                assert got == sent[topic]  # every message, in its topic's order
                assert await popper.pop(session=SESSION, topic=topic, timeout=0.2) is None  # exactly once
            await pusher.aclose()
            await popper.aclose()
            assert ga.links is not None and gb.links is not None
            stats = ga.links.sender_statistics()
            assert sorted(stats) == ["10000", "10000#1", "10000#2"]
            assert all(s.connected for s in stats.values())
            assert sum(s.messages_acked for s in stats.values()) == 90
            assert all(s.messages_acked > 0 for s in stats.values())  # nine topics spread over all three
            assert all(s.reconnects == 0 for s in stats.values())  # no lane replaced another
            listener = gb.links.listener_statistics()
            assert listener is not None and listener.connections == 3 and listener.peers == ("9999",)
            # each lane's congestion controller, read at scrape time (QUIC only; from the workers too)
            controllers = {
                (sample.labels["peer"], sample.labels["lane"]): sample.labels["controller"]
                for family in ga.registry.collect() if family.name == "fedgate_link_carrier_controller"
                for sample in family.samples
            }
            windows = [ga.registry.get_sample_value("fedgate_link_carrier_congestion_window_bytes",
                                                    {"peer": "10000", "lane": lane}) for lane in "012"]
            if transport == "quic":
                assert controllers == {("10000", lane): "ltbbr" for lane in "012"}
                assert all(w is not None and w > 0 for w in windows)
            else:
                assert controllers == {} and windows == [None] * 3
            if transport == "quic" and not workers:  # one QUIC connection per lane
                quic_servers = [s for s in gb.links._servers if type(s).__name__ == "QuicCarrierServer"]
                assert [s.connections for s in quic_servers] == [3]  # type: ignore[attr-defined]
            if workers:  # the QUIC connections ran in worker processes at both ends
                for gateway in (ga, gb):
                    assert gateway.links is not None
                    pids = gateway.links._carriers["quic"].worker_pids  # type: ignore[attr-defined]
                    assert len(pids) == workers and None not in pids and os.getpid() not in pids

    asyncio.run(main())


def test_peer_down_for_a_while_then_everything_arrives(tmp_path: pathlib.Path) -> None:
    """The sender's push succeeds while the peer gateway is down; the outbox delivers when it returns."""
    a, b = pair(tmp_path, "tcp", tls=False)
    metrics = free_port()
    a["metrics"]["listen"] = f"127.0.0.1:{metrics}"
    gw_b = GatewayProcess(b, tmp_path / "10000")
    with processes(GatewayProcess(a, tmp_path / "9999")):

        async def push() -> None:
            client = OsxQueueClient(f"127.0.0.1:{front_of(a)}", party="9999")
            for i in range(20):
                await client.push(session=SESSION, topic=TOPIC, target="10000", payload=b"%d" % i)
            await client.aclose()

        asyncio.run(push())
        time.sleep(1.0)  # a few failed connection attempts
        live = subprocess.run(
            [sys.executable, "-m", "fedgate", "route", "show", a["routes"]["file"], "10000",
             "--live", f"http://127.0.0.1:{metrics}/metrics"], capture_output=True, text=True, timeout=60, check=False)
        assert live.returncode == 0, live.stderr
        assert "FAILING" in live.stdout and "link to party 10000: DOWN, outbox 20 message(s)" in live.stdout
        with processes(gw_b):

            async def pop() -> list[bytes | None]:
                client = OsxQueueClient(f"127.0.0.1:{front_of(b)}", party="10000")
                got = [await client.pop(session=SESSION, topic=TOPIC, timeout=60) for _ in range(20)]
                await client.aclose()
                return got

            assert asyncio.run(pop()) == [b"%d" % i for i in range(20)]


def test_a_peer_with_another_partys_certificate_is_refused(tmp_path: pathlib.Path) -> None:
    a, b = pair(tmp_path, "tcp", tls=True)
    # Gateway B presents party 9999's certificate while claiming to be 10000.
    b["tls"]["cert_file"] = a["tls"]["cert_file"]
    b["tls"]["key_file"] = a["tls"]["key_file"]

    async def main() -> None:
        async with running(build(b)) as gb, running(build(a)) as ga:
            client = OsxQueueClient(f"127.0.0.1:{front_of(a)}", party="9999")
            await client.push(session=SESSION, topic=TOPIC, target="10000", payload=b"x")  # durable in the outbox
            await client.aclose()
            await asyncio.sleep(1.5)
            assert ga.links is not None and gb.store is not None
            stats = ga.links.sender_statistics()["10000"]
            assert not stats.connected
            assert "9999" in stats.last_error  # says whose certificate was presented
            assert gb.store.statistics().queued_messages == 0
            assert ga.store is not None and ga.store.statistics().outbox_messages == 1

    asyncio.run(main())


def test_links_without_tls_or_insecure_stay_off_and_say_so(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = gateway_data(tmp_path, "9999", {"10000": {"default": [{"ip": "127.0.0.1", "port": free_port(),
                                                                "transport": "tcp"}]}}, link={"insecure": False})

    async def main() -> None:
        async with running(build(a)) as ga:
            client = OsxQueueClient(f"127.0.0.1:{front_of(a)}", party="9999")
            await client.push(session=SESSION, topic=TOPIC, target="10000", payload=b"x")
            await client.aclose()
            assert ga.store is not None and ga.store.statistics().outbox_messages == 1
            assert ga.links is not None and ga.links.sender_statistics() == {}

    with caplog.at_level("WARNING"):
        asyncio.run(main())
    assert "links disabled" in caplog.text


def test_doctor_reaches_a_quic_peer_through_worker_processes(tmp_path: pathlib.Path) -> None:
    a, b = pair(tmp_path, "quic", tls=True)
    a["quic"] = {"workers": 2}
    config = GatewayProcess(a, tmp_path / "9999").config_file  # writes A's config; A need not run

    async def main() -> None:
        async with running(build(b)):
            out = await asyncio.to_thread(doctor, config, "10000", step_timeout=10)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "[ok] handshake" in out.stdout, out.stdout
        assert "quic connection open (mTLS)" in out.stdout, out.stdout
        assert out.stderr == "", out.stderr  # the workers were stopped before the event loop closed

    asyncio.run(main())
