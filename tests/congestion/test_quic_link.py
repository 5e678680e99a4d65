"""The ``quic`` carrier on 127.0.0.1: intact ordered bytes, streams, mutual TLS, failures, qlog."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
import uvloop
from aioquic.asyncio import server as aioquic_server
from aioquic.quic.configuration import QuicConfiguration

from fedgate.congestion.config import QuicConfig
from fedgate.congestion.quic_link import QuicCarrier, QuicIdentity, _Server
from fedgate.errors import ConfigError, PeerUnavailableError
from fedgate.proxy.carrier import ByteChannel, Carrier
from tests.congestion.certs import CertAuthority
from tests.congestion.channels import collect, mutual_tls
from tests.congestion.relay import UdpRelay

pytestmark = pytest.mark.timeout(60)

LOCAL = "127.0.0.1"


def run(coro: Awaitable[None], *, loop: str = "asyncio") -> None:
    async def wrapper() -> None:
        await asyncio.wait_for(coro, 45)

    if loop == "uvloop":
        uvloop.run(wrapper())
    else:
        asyncio.run(wrapper())


def test_is_a_carrier() -> None:
    carrier: Carrier = QuicCarrier()
    assert carrier.name == "quic"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_bytes_arrive_intact_and_in_order(loop: str) -> None:
    rng = random.Random(4)
    blob = rng.randbytes(6 * 1024 * 1024)

    async def scenario() -> None:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handler(channel: ByteChannel) -> None:
            assert channel.peer_party is None
            data = await collect(channel)
            await channel.send(hashlib.sha256(data).digest())
            got.set_result(data)

        server_carrier, client_carrier = QuicCarrier(), QuicCarrier()
        server = await server_carrier.listen(LOCAL, 0, tls=None, handler=handler)
        try:
            channel = await client_carrier.connect(LOCAL, server.port, tls=None, server_hostname=None, timeout=5)
            assert channel.description.startswith("quic 127.0.0.1:")
            offset = 0
            while offset < len(blob):
                size = rng.choice([1, 17, 1400, 65536, 300_000])
                await channel.send(memoryview(blob)[offset : offset + size])
                offset += size
            await channel.aclose()
            digest = await channel.receive()
            assert digest == hashlib.sha256(blob).digest()
            assert await channel.receive() == b""
            received = await got
            assert received == blob
            stats = channel.statistics()
            assert stats.name == "ltbbr"
            assert stats.delivered_bytes >= len(blob)
        finally:
            await client_carrier.aclose()
            await server.aclose()

    run(scenario(), loop=loop)


def test_aioquic_runs_on_a_precise_clock_under_uvloop() -> None:
    # uvloop's loop.time() counts whole milliseconds; ACK times taken from it cut every RTT and
    # delivery-rate sample to the millisecond. The connection must use the precise clock.
    async def scenario() -> None:
        async def handler(channel: ByteChannel) -> None:
            await collect(channel)
            await channel.aclose()

        server_carrier, client_carrier = QuicCarrier(), QuicCarrier()
        server = await server_carrier.listen(LOCAL, 0, tls=None, handler=handler)
        try:
            channel = await client_carrier.connect(LOCAL, server.port, tls=None, server_hostname=None, timeout=5)
            quic = channel._protocol._quic
            stamps: list[float] = []
            receive = quic.receive_datagram

            def recording(data: bytes, addr: object, now: float) -> None:
                stamps.append(now)
                receive(data, addr, now=now)

            setattr(quic, "receive_datagram", recording)  # noqa: B010 (instance-level hook)
            await channel.send(bytes(2 * 1024 * 1024))
            await channel.aclose()
            assert await channel.receive() == b""
        finally:
            await client_carrier.aclose()
            await server.aclose()
        assert len(stamps) >= 10
        whole_ms = [t for t in stamps if abs(t * 1000 - round(t * 1000)) < 1e-6]
        assert len(whole_ms) <= len(stamps) // 10, (len(whole_ms), len(stamps))

    run(scenario(), loop="uvloop")


def test_a_listener_hands_1rtt_datagrams_of_known_connections_straight_over(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[tuple[str, bytes]] = []
    parsed: list[bytes] = []
    real_parse = aioquic_server.pull_quic_header  # type: ignore[attr-defined]

    def counting_parse(buf: Any, host_cid_length: int) -> Any:
        parsed.append(buf.data)
        return real_parse(buf, host_cid_length=host_cid_length)

    monkeypatch.setattr(aioquic_server, "pull_quic_header", counting_parse)

    class Known:
        def __init__(self, name: str) -> None:
            self.name = name

        def datagram_received(self, data: bytes, addr: object) -> None:
            got.append((self.name, data))

    async def scenario() -> None:
        server = _Server(configuration=QuicConfiguration(is_client=False), create_protocol=Known)
        cid = bytes(range(8))  # aioquic's connection ids are 8 bytes
        server._protocols[cid] = cast(Any, Known("conn"))
        short = bytes([0x41]) + cid + b"protected payload"
        server.datagram_received(short, ("127.0.0.1", 1))
        assert got == [("conn", short)] and parsed == []  # delivered without aioquic's header parse
        # everything else takes aioquic's path, which parses the header and drops these
        for other in (bytes([0x41]) + bytes(8) + b"payload",  # a connection id nobody holds
                      bytes([0x01]) + cid + b"payload",  # fixed bit clear: not a QUIC packet
                      bytes([0x41]) + cid[:4]):  # too short to hold a connection id
            server.datagram_received(other, ("127.0.0.1", 1))
        assert got == [("conn", short)] and len(parsed) == 3

    run(scenario())


def test_channels_to_one_peer_share_one_connection() -> None:
    async def scenario() -> None:
        async def echo(channel: ByteChannel) -> None:
            data = await collect(channel)
            await channel.send(data[::-1])

        server_carrier, client_carrier = QuicCarrier(), QuicCarrier(QuicConfig(congestion_control="newreno"))
        server = await server_carrier.listen(LOCAL, 0, tls=None, handler=echo)
        try:
            channels = [
                await client_carrier.connect(LOCAL, server.port, tls=None, server_hostname=None, timeout=5)
                for _ in range(3)
            ]
            for i, channel in enumerate(channels):
                await channel.send(f"stream-{i}".encode() * 1000)
            for channel in channels:
                await channel.aclose()
            replies = [await collect(channel) for channel in channels]
            for i, reply in enumerate(replies):
                assert reply == (f"stream-{i}".encode() * 1000)[::-1]
            assert server.connections == 1
            assert channels[0].statistics().name == "newreno"
        finally:
            await client_carrier.aclose()
            await server.aclose()

    run(scenario())


def _mtls_pair(
    tmp_path: pathlib.Path,
    server_id: QuicIdentity,
    client_id: QuicIdentity,
    scenario: Callable[[QuicCarrier, int, list[ByteChannel]], Awaitable[None]],
) -> None:
    async def main() -> None:
        accepted: list[ByteChannel] = []

        async def handler(channel: ByteChannel) -> None:
            accepted.append(channel)
            data = await collect(channel)
            await channel.send(data)

        server_carrier = QuicCarrier(identity=server_id)
        client_carrier = QuicCarrier(identity=client_id)
        server = await server_carrier.listen(LOCAL, 0, tls=mutual_tls(), handler=handler)
        try:
            await scenario(client_carrier, server.port, accepted)
        finally:
            await client_carrier.aclose()
            await server.aclose()

    run(main())


def test_mutual_tls_exposes_both_parties(tmp_path: pathlib.Path) -> None:
    ca = CertAuthority(tmp_path)

    async def scenario(client: QuicCarrier, port: int, accepted: list[ByteChannel]) -> None:
        channel = await client.connect(LOCAL, port, tls=mutual_tls(), server_hostname="9999", timeout=5)
        assert channel.peer_party == "9999"
        await channel.send(b"hello")
        await channel.aclose()
        assert await collect(channel) == b"hello"
        assert [c.peer_party for c in accepted] == ["10000"]

    _mtls_pair(tmp_path, ca.issue("9999"), ca.issue("10000"), scenario)


def test_party_id_in_a_san_is_accepted(tmp_path: pathlib.Path) -> None:
    ca = CertAuthority(tmp_path)

    async def scenario(client: QuicCarrier, port: int, accepted: list[ByteChannel]) -> None:
        channel = await client.connect(LOCAL, port, tls=mutual_tls(), server_hostname="9999", timeout=5)
        assert channel.peer_party == "9999"
        await channel.aclose()

    _mtls_pair(tmp_path, ca.issue("9999", cn="gw-a.example", sans=("9999",)), ca.issue("10000"), scenario)


def test_wrong_party_is_refused(tmp_path: pathlib.Path) -> None:
    ca = CertAuthority(tmp_path)

    async def scenario(client: QuicCarrier, port: int, accepted: list[ByteChannel]) -> None:
        with pytest.raises(PeerUnavailableError, match=r"party '9999', expected '8888'"):
            await client.connect(LOCAL, port, tls=mutual_tls(), server_hostname="8888", timeout=5)
        assert accepted == []

    _mtls_pair(tmp_path, ca.issue("9999"), ca.issue("10000"), scenario)


def test_client_from_another_ca_is_refused(tmp_path: pathlib.Path) -> None:
    ca = CertAuthority(tmp_path)
    rogue = CertAuthority(tmp_path, name="rogue CA")
    rogue_client = rogue.issue("10000")
    # the rogue client trusts the real CA, so it accepts the server; the server must refuse it
    client_id = QuicIdentity(ca.ca_file, rogue_client.cert_file, rogue_client.key_file)

    async def scenario(client: QuicCarrier, port: int, accepted: list[ByteChannel]) -> None:
        with pytest.raises(PeerUnavailableError, match="certificate rejected"):
            await client.connect(LOCAL, port, tls=mutual_tls(), server_hostname="9999", timeout=5)
        await asyncio.sleep(0.05)
        assert accepted == []

    _mtls_pair(tmp_path, ca.issue("9999"), client_id, scenario)


def test_insecure_client_is_refused_by_mutual_server(tmp_path: pathlib.Path) -> None:
    ca = CertAuthority(tmp_path)

    async def scenario(client: QuicCarrier, port: int, accepted: list[ByteChannel]) -> None:
        with pytest.raises(PeerUnavailableError, match="no certificate"):
            await QuicCarrier().connect(LOCAL, port, tls=None, server_hostname=None, timeout=5)

    _mtls_pair(tmp_path, ca.issue("9999"), ca.issue("10000"), scenario)


def test_mutual_tls_needs_an_identity() -> None:
    async def scenario() -> None:
        with pytest.raises(ConfigError, match="no identity"):
            await QuicCarrier().connect(LOCAL, 9, tls=mutual_tls(), server_hostname="1", timeout=1)

    run(scenario())


def test_unreachable_peer_fails_within_timeout() -> None:
    async def scenario() -> None:
        carrier = QuicCarrier()
        with pytest.raises(PeerUnavailableError, match=r"no QUIC handshake within 0\.5 s"):
            await carrier.connect(LOCAL, 9, tls=None, server_hostname=None, timeout=0.5)
        await carrier.aclose()

    run(scenario())


def test_server_close_fails_channels_with_reason() -> None:
    async def scenario() -> None:
        started = asyncio.Event()

        async def handler(channel: ByteChannel) -> None:
            started.set()
            await asyncio.sleep(30)

        server = await QuicCarrier().listen(LOCAL, 0, tls=None, handler=handler)
        client = QuicCarrier()
        channel = await client.connect(LOCAL, server.port, tls=None, server_hostname=None, timeout=5)
        await channel.send(b"x")
        await started.wait()
        await server.aclose()
        with pytest.raises(PeerUnavailableError, match="server shutting down"):
            await channel.receive()
        with pytest.raises(PeerUnavailableError):
            await channel.send(b"more")
        await client.aclose()

    run(scenario())


def test_qlog_trace_written_per_peer(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        async def handler(channel: ByteChannel) -> None:
            await collect(channel)

        traced = QuicConfig(qlog_dir=str(tmp_path), qlog_peers=("127.0.0.1",))
        server = await QuicCarrier().listen(LOCAL, 0, tls=None, handler=handler)
        client = QuicCarrier(traced)
        channel = await client.connect(LOCAL, server.port, tls=None, server_hostname=None, timeout=5)
        await channel.send(b"traced" * 1000)
        await channel.aclose()
        await asyncio.sleep(0.1)
        await client.aclose()
        untraced = QuicCarrier(QuicConfig(qlog_dir=str(tmp_path), qlog_peers=("10.9.9.9",)))
        other = await untraced.connect(LOCAL, server.port, tls=None, server_hostname=None, timeout=5)
        await other.aclose()
        await untraced.aclose()
        await server.aclose()
        await asyncio.sleep(0.1)

    run(scenario())
    files = list(tmp_path.glob("*.qlog"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    events = doc["traces"][0]["events"]
    assert any(e.get("name") == "recovery:metrics_updated" or "metrics_updated" in str(e) for e in events)


def test_qlog_dir_must_exist(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        QuicCarrier(QuicConfig(qlog_dir=str(tmp_path / "missing")))


def test_path_outage_shorter_than_idle_timeout_is_survived() -> None:
    blob = random.Random(9).randbytes(2 * 1024 * 1024)

    async def scenario() -> None:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handler(channel: ByteChannel) -> None:
            got.set_result(await collect(channel))

        config = QuicConfig(idle_timeout_s=6.0, keepalive_s=0.5)
        server = await QuicCarrier(config).listen(LOCAL, 0, tls=None, handler=handler)
        relay = await UdpRelay.start((LOCAL, server.port))
        client = QuicCarrier(config)
        try:
            channel = await client.connect(LOCAL, relay.port, tls=None, server_hostname=None, timeout=5)
            await channel.send(blob[: len(blob) // 2])
            relay.blocked = True
            sender = asyncio.create_task(channel.send(blob[len(blob) // 2 :]))
            await asyncio.sleep(2.0)  # two seconds of total path loss
            relay.blocked = False
            await sender
            await channel.aclose()
            assert await asyncio.wait_for(got, 20) == blob
        finally:
            await client.aclose()
            await server.aclose()
            relay.close()

    run(scenario())


def test_path_outage_longer_than_idle_timeout_fails_cleanly() -> None:
    async def scenario() -> None:
        async def handler(channel: ByteChannel) -> None:
            await collect(channel)

        config = QuicConfig(idle_timeout_s=1.5, keepalive_s=0.3)
        server = await QuicCarrier(config).listen(LOCAL, 0, tls=None, handler=handler)
        relay = await UdpRelay.start((LOCAL, server.port))
        client = QuicCarrier(config)
        try:
            channel = await client.connect(LOCAL, relay.port, tls=None, server_hostname=None, timeout=5)
            await channel.send(b"before the outage")
            relay.blocked = True
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(PeerUnavailableError, match=r"[Ii]dle timeout"):
                await asyncio.wait_for(channel.receive(), 10)
            assert loop.time() - start < 1.5 * 2 + 1
            with pytest.raises(PeerUnavailableError):
                await channel.send(b"after")
            # a new connect makes a fresh connection once the path is back
            relay.blocked = False
            again = await client.connect(LOCAL, relay.port, tls=None, server_hostname=None, timeout=5)
            await again.send(b"back")
            await again.aclose()
        finally:
            await client.aclose()
            await server.aclose()
            relay.close()

    run(scenario())


def test_address_change_mid_transfer_is_survived() -> None:
    # The client's address as the server sees it changes (NAT rebinding): QUIC connection ids keep
    # the connection, the server validates the new path, and the bytes still arrive intact.
    blob = random.Random(11).randbytes(2 * 1024 * 1024)

    async def scenario() -> None:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handler(channel: ByteChannel) -> None:
            got.set_result(await collect(channel))

        server = await QuicCarrier().listen(LOCAL, 0, tls=None, handler=handler)
        relay = await UdpRelay.start((LOCAL, server.port))
        client = QuicCarrier()
        try:
            channel = await client.connect(LOCAL, relay.port, tls=None, server_hostname=None, timeout=5)
            await channel.send(blob[: len(blob) // 2])
            relay.rebind()
            await channel.send(blob[len(blob) // 2 :])
            await channel.aclose()
            assert await asyncio.wait_for(got, 20) == blob
            assert server.connections == 1
        finally:
            await client.aclose()
            await server.aclose()
            relay.close()

    run(scenario())
