"""The tcp carrier on 127.0.0.1: plain and mTLS channels, party identity, refusals; the carrier registry."""

from __future__ import annotations

import asyncio
import datetime
import logging
import pathlib
import socket

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedgate.errors import PeerUnavailableError, UnknownPluginError
from fedgate.proxy.carrier import ByteChannel
from fedgate.proxy.carriers import carrier_names, check_carrier_name, load_carrier
from fedgate.proxy.certs import client_context, issue_parties, load_or_create_ca, party_files, server_context
from fedgate.proxy.tcp_carrier import TcpCarrier


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("certs")
    issue_parties(d, ["1", "2"])
    ca = load_or_create_ca(d)
    # A certificate from the right CA that names no party (CN only).
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anon")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    (d / "party-anon.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "party-anon.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    # A second CA and a party certificate it signed.
    other = d / "other"
    issue_parties(other, ["1"])
    return d


async def echo_once(channel: ByteChannel, seen: list[str | None]) -> None:
    seen.append(channel.peer_party)
    data = await channel.receive()
    await channel.send(data.upper())


def test_plain_channel_round_trip_and_eof() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        carrier = TcpCarrier()
        server = await carrier.listen("127.0.0.1", 0, tls=None, handler=lambda ch: echo_once(ch, seen))
        channel = await carrier.connect("127.0.0.1", server.port, tls=None, server_hostname=None, timeout=5)
        await channel.send(memoryview(b"hello"))
        assert await channel.receive() == b"HELLO"
        assert await channel.receive() == b""  # the handler returned: the server closed the channel
        assert channel.peer_party is None and seen == [None]
        assert channel.description == f"tcp 127.0.0.1:{server.port}"
        await channel.aclose()
        await server.aclose()

    asyncio.run(main())


def test_mtls_both_ends_learn_the_party(certs: pathlib.Path) -> None:
    async def main() -> None:
        seen: list[str | None] = []
        carrier = TcpCarrier()
        server = await carrier.listen("127.0.0.1", 0, tls=server_context(*party_files(certs, "2")),
                                      handler=lambda ch: echo_once(ch, seen))
        channel = await carrier.connect("127.0.0.1", server.port, tls=client_context(*party_files(certs, "1")),
                                        server_hostname="localhost", timeout=5)
        assert channel.peer_party == "2"
        await channel.send(b"x" * 100_000)
        got = b""
        while len(got) < 100_000:
            data = await channel.receive()
            assert data
            got += data
        assert got == b"X" * 100_000 and seen == ["1"]
        await channel.aclose()
        await server.aclose()

    asyncio.run(main())


def test_certificate_without_party_is_refused_with_a_log_line(
    certs: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        seen: list[str | None] = []
        carrier = TcpCarrier()
        server = await carrier.listen("127.0.0.1", 0, tls=server_context(*party_files(certs, "2")),
                                      handler=lambda ch: echo_once(ch, seen))
        channel = await carrier.connect("127.0.0.1", server.port, tls=client_context(*party_files(certs, "anon")),
                                        server_hostname=None, timeout=5)
        assert await channel.receive() == b""  # the server dropped us
        assert seen == []
        await channel.aclose()
        # And the other way round: a server without a party is refused by the client.
        anon = await carrier.listen("127.0.0.1", 0, tls=server_context(*party_files(certs, "anon")),
                                    handler=lambda ch: echo_once(ch, seen))
        with pytest.raises(PeerUnavailableError, match="names no party"):
            await carrier.connect("127.0.0.1", anon.port, tls=client_context(*party_files(certs, "1")),
                                  server_hostname=None, timeout=5)
        await server.aclose()
        await anon.aclose()

    with caplog.at_level(logging.ERROR, logger="fedgate.link.tcp"):
        asyncio.run(main())
    assert any("refusing link from" in r.getMessage() and "names no party" in r.getMessage() for r in caplog.records)


def test_certificate_from_another_ca_never_reaches_the_handler(certs: pathlib.Path) -> None:
    async def main() -> None:
        seen: list[str | None] = []
        carrier = TcpCarrier()
        server = await carrier.listen("127.0.0.1", 0, tls=server_context(*party_files(certs, "2")),
                                      handler=lambda ch: echo_once(ch, seen))
        other = certs / "other"
        client_tls = client_context(certs / "ca.pem", other / "party-1.pem", other / "party-1.key")
        try:
            channel = await carrier.connect("127.0.0.1", server.port, tls=client_tls, server_hostname=None,
                                            timeout=5)
        except PeerUnavailableError:
            pass  # refused during the handshake
        else:  # TLS 1.3: the client may finish first and learn of the refusal on its first read
            with pytest.raises((OSError, ConnectionError)):
                if await channel.receive() == b"":
                    raise ConnectionError("closed")
            await channel.aclose()
        assert seen == []
        await server.aclose()

    asyncio.run(main())


def test_connect_to_a_closed_port_is_peer_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        with pytest.raises(PeerUnavailableError, match=f"tcp 127.0.0.1:{port}"):
            await TcpCarrier().connect("127.0.0.1", port, tls=None, server_hostname=None, timeout=5)

    asyncio.run(main())


def test_registry_builds_tcp_and_refuses_unknown_names() -> None:
    assert carrier_names() == ["quic", "rdma", "tcp"]
    carrier = load_carrier("tcp")
    assert isinstance(carrier, TcpCarrier) and carrier.name == "tcp"
    with pytest.raises(UnknownPluginError, match="valid names: quic, rdma, tcp") as info:
        check_carrier_name("udp", path="route_table.9999.default[0].transport")
    assert info.value.path == "route_table.9999.default[0].transport"
