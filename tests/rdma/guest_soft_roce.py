"""The RDMA carrier's tests on a real device, run inside the QEMU soft-RoCE guest.

Run by ``scripts/rdma-qemu-rig.py`` with the guest's system ``/usr/bin/python3`` (pyverbs from
Debian's python3-pyverbs; no pytest there, so this file is its own small runner). Each case is an
``async`` function; results go to ``$FEDGATE_RIG_OUT/results.json`` as ``{case: "ok" | error}``.
``tests/rdma/test_soft_roce.py`` boots the guest once and turns each case into a pytest test.
``--peer HOST PORT`` is the child-process mode of the disappearing-peer case.
"""

from __future__ import annotations

import asyncio
import faulthandler
import hashlib
import json
import os
import pathlib
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import replace

from fedgate.errors import PeerUnavailableError
from fedgate.proxy.carrier import ByteChannel
from fedgate.rdma.config import RdmaConfig

K_HOST = "10.0.2.15"  # the guest's eth0, where rxe0 lives
K_CASE_TIMEOUT = 240.0  # seconds per case; emulated RDMA moves ~30 MB/s
K_MIB = 1024 * 1024  # bytes
K_SIZES = (1, 2, 100, 4096, 65520, 65521, 65536, 200_000, K_MIB, K_MIB + 7, 16 * K_MIB + 3, 64 * K_MIB)

Case = Callable[[], Awaitable[None]]


def payload(index: int, size: int) -> bytes:
    """Deterministic content that differs per message (catches reordering and stale buffers)."""
    seed = hashlib.sha256(f"{index}:{size}".encode()).digest()
    block = (seed * (4096 // len(seed) + 1))[:4096]
    return (block * (size // 4096 + 1))[:size]


class Pair:
    """Two carriers (each with its own device context) and one channel between them."""

    def __init__(self, config: RdmaConfig) -> None:
        from fedgate.rdma.verbs_link import RdmaCarrier

        self.client_carrier = RdmaCarrier(config)
        self.server_carrier = RdmaCarrier(config)
        self.accepted: asyncio.Queue[ByteChannel] = asyncio.Queue()
        self.release = asyncio.Event()

    async def __aenter__(self) -> tuple[ByteChannel, ByteChannel]:
        async def handler(channel: ByteChannel) -> None:
            await self.accepted.put(channel)
            await self.release.wait()

        self.server = await self.server_carrier.listen(K_HOST, 0, tls=None, handler=handler)
        client = await self.client_carrier.connect(
            K_HOST, self.server.port, tls=None, server_hostname=None, timeout=30.0
        )
        server = await asyncio.wait_for(self.accepted.get(), 30.0)
        return client, server

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.client_carrier.aclose()
        await self.server.aclose()
        await self.server_carrier.aclose()


async def case_sizes_round_trip_intact_and_in_order() -> None:
    """1 byte to 64 MiB, eager and rendezvous, echoed back: intact and in order both ways."""
    async with Pair(RdmaConfig()) as (client, server):

        async def echo() -> None:
            while data := await server.receive():
                await server.send(data)

        echo_task = asyncio.create_task(echo())
        for i, size in enumerate(K_SIZES):
            await client.send(payload(i, size))
        for i, size in enumerate(K_SIZES):
            got = await client.receive()
            assert got == payload(i, size), f"message {i} ({size} bytes) came back as {len(got)} other bytes"
        await client.aclose()
        await asyncio.wait_for(echo_task, 30.0)


async def case_both_sides_sending_never_deadlock() -> None:
    """A tiny credit window, both sides sending mixed sizes while receiving: everything arrives."""
    config = RdmaConfig(recv_slots=4, slot_bytes=4096, read_chunk_bytes=8192, max_reads=2, max_rendezvous=2)
    sizes = [1, 4000, 4080, 4081, 9000, 30_000, 3, 100_000, 17] * 25
    async with Pair(config) as (a, b):

        async def pump(ch: ByteChannel, tag: int) -> list[int]:
            async def sender() -> None:
                for i, size in enumerate(sizes):
                    await ch.send(payload(tag * 100_000 + i, size))

            async def receiver() -> list[int]:
                bad = []
                for i, size in enumerate(sizes):
                    if await ch.receive() != payload((1 - tag) * 100_000 + i, size):
                        bad.append(i)
                return bad

            sent = asyncio.create_task(sender())
            bad = await receiver()
            await sent
            return bad

        bad_a, bad_b = await asyncio.wait_for(asyncio.gather(pump(a, 0), pump(b, 1)), 180.0)
        assert not bad_a and not bad_b, f"corrupt or reordered messages: {bad_a[:5]} {bad_b[:5]}"


async def case_orderly_close_delivers_everything_then_end_of_stream() -> None:
    """aclose() drains: what was sent before it arrives, then the end of stream, to a reading peer."""
    sizes = [10 + i * 3000 for i in range(50)]  # eager below 64 KiB, rendezvous above
    async with Pair(RdmaConfig()) as (client, server):

        async def send_then_close() -> None:
            for i, size in enumerate(sizes):
                await client.send(payload(i, size))
            await client.aclose()

        closer = asyncio.create_task(send_then_close())
        for i, size in enumerate(sizes):
            assert await server.receive() == payload(i, size), f"message {i}"
        assert await server.receive() == b""
        assert await server.receive() == b""
        await asyncio.wait_for(closer, 30.0)


async def case_close_towards_a_peer_that_does_not_read_is_bounded() -> None:
    """aclose() gives up after close_timeout_s when the peer never takes in a large message."""
    async with Pair(RdmaConfig(close_timeout_s=2.0)) as (client, _server):
        await client.send(payload(0, 4 * K_MIB))
        start = time.monotonic()
        await asyncio.wait_for(client.aclose(), 30.0)
        assert time.monotonic() - start < 20.0
        try:
            await client.send(b"x")
        except PeerUnavailableError:
            pass
        else:
            raise AssertionError("send() after aclose() succeeded")


async def case_peer_process_killed_is_detected() -> None:
    """The peer process dies (SIGKILL): receive and send fail with PeerUnavailableError."""
    from fedgate.rdma.verbs_link import RdmaCarrier

    carrier = RdmaCarrier(RdmaConfig(completion_timeout_s=5.0))
    accepted: asyncio.Queue[ByteChannel] = asyncio.Queue()
    done = asyncio.Event()

    async def handler(channel: ByteChannel) -> None:
        await accepted.put(channel)
        await done.wait()

    server = await carrier.listen(K_HOST, 0, tls=None, handler=handler)
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--peer", K_HOST, str(server.port), stdout=asyncio.subprocess.PIPE
    )
    try:
        channel = await asyncio.wait_for(accepted.get(), 60.0)
        assert await channel.receive() == b"hello"
        assert child.stdout is not None
        assert (await child.stdout.readline()).strip() == b"sent"
        child.send_signal(signal.SIGKILL)
        await child.wait()
        start = time.monotonic()
        try:
            await asyncio.wait_for(channel.receive(), 60.0)
        except PeerUnavailableError as exc:
            print(f"  detected in {time.monotonic() - start:.2f} s: {exc}")
        else:
            raise AssertionError("receive() returned instead of failing")
        try:
            await channel.send(b"x" * 100)
        except PeerUnavailableError:
            pass
        else:
            raise AssertionError("send() to a dead peer succeeded")
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        done.set()
        await server.aclose()
        await carrier.aclose()


async def case_peer_queue_pair_gone_is_detected_by_completion_deadline() -> None:
    """The peer's QP vanishes but its control connection stays up: our SEND never completes."""
    async with Pair(RdmaConfig(completion_timeout_s=2.0)) as (client, server):
        await client.send(b"before")
        assert await server.receive() == b"before"
        verbs, qp = server._v, server._qp  # type: ignore[attr-defined]
        attr = verbs.qp.QPAttr()
        attr.qp_state = verbs.e.IBV_QPS_ERR
        qp.modify(attr, verbs.e.IBV_QP_STATE)  # the peer's QP breaks; its control connection stays up
        start = time.monotonic()
        try:
            await client.send(b"after")
            await asyncio.wait_for(client.receive(), 60.0)
        except PeerUnavailableError as exc:
            print(f"  detected in {time.monotonic() - start:.2f} s: {exc}")
        else:
            raise AssertionError("the lost peer QP was not detected")


async def case_garbage_handshake_is_refused_and_server_keeps_serving() -> None:
    async with Pair(RdmaConfig()) as (client, server):
        reader, writer = await asyncio.open_connection(K_HOST, _port_of(client))
        writer.write(b'{"v": 99}\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30.0)  # its hello, then EOF: it hung up
        assert answer.count(b"\n") <= 1 and b"READY" not in answer, answer
        writer.close()
        await client.send(b"still fine")
        assert await server.receive() == b"still fine"


def _self_signed(directory: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.UniformResourceIdentifier(f"fedgate:party:{name}")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def case_tls_control_connection_authenticates_both_parties() -> None:
    """mTLS on the control connection: each end learns the other's party from its certificate."""
    import ssl
    import tempfile

    from fedgate.rdma.verbs_link import RdmaCarrier

    with tempfile.TemporaryDirectory() as tmp:
        server_cert, server_key = _self_signed(pathlib.Path(tmp), "party-9999")
        client_cert, client_key = _self_signed(pathlib.Path(tmp), "party-10000")
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(server_cert, server_key)
        server_tls.load_verify_locations(client_cert)
        server_tls.verify_mode = ssl.CERT_REQUIRED
        client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_tls.load_cert_chain(client_cert, client_key)
        client_tls.load_verify_locations(server_cert)
        server_carrier, client_carrier = RdmaCarrier(RdmaConfig()), RdmaCarrier(RdmaConfig())
        seen: asyncio.Queue[tuple[str | None, bytes]] = asyncio.Queue()

        async def handler(channel: ByteChannel) -> None:
            await seen.put((channel.peer_party, await channel.receive()))

        server = await server_carrier.listen(K_HOST, 0, tls=server_tls, handler=handler)
        try:
            client = await client_carrier.connect(
                K_HOST, server.port, tls=client_tls, server_hostname="party-9999", timeout=30.0
            )
            assert client.peer_party == "party-9999"  # from the SAN URI fedgate:party:<id>
            await client.send(payload(1, 300_000))
            party, data = await asyncio.wait_for(seen.get(), 60.0)
            assert party == "party-10000" and data == payload(1, 300_000)
            await client.aclose()
        finally:
            await client_carrier.aclose()
            await server.aclose()
            await server_carrier.aclose()


async def case_closing_a_server_keeps_the_carriers_outgoing_channels() -> None:
    """One carrier listens and dials (as a gateway does): closing its server spares its dialled channels."""
    from fedgate.rdma.verbs_link import RdmaCarrier

    gateway, peer = RdmaCarrier(RdmaConfig()), RdmaCarrier(RdmaConfig())
    inbox: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(channel: ByteChannel) -> None:
        while data := await channel.receive():
            await inbox.put(data)

    async def idle(channel: ByteChannel) -> None:
        await channel.receive()

    peer_server = await peer.listen(K_HOST, 0, tls=None, handler=handler)
    gateway_server = await gateway.listen(K_HOST, 0, tls=None, handler=idle)
    try:
        inbound = await peer.connect(K_HOST, gateway_server.port, tls=None, server_hostname=None, timeout=30.0)
        outgoing = await gateway.connect(K_HOST, peer_server.port, tls=None, server_hostname=None, timeout=30.0)
        await gateway_server.aclose()
        assert await asyncio.wait_for(inbound.receive(), 30.0) == b""  # the accepted channel was closed
        await outgoing.send(b"still open")
        assert await asyncio.wait_for(inbox.get(), 30.0) == b"still open"
        await outgoing.aclose()
        await inbound.aclose()
    finally:
        await peer_server.aclose()
        await gateway.aclose()
        await peer.aclose()


async def case_benchmark_script_runs_against_tcp() -> None:
    """fedgate.rdma.bench in local mode runs both transports (the figures are emulated: meaningless)."""
    from fedgate.rdma.bench import main as bench_main

    args = ["local", "--listen", f"{K_HOST}:18515", "--sizes", f"1024,{K_MIB}", "--seconds", "0.1", "--rounds", "3"]
    code = await asyncio.get_running_loop().run_in_executor(None, bench_main, args)
    assert code == 0


def _port_of(channel: ByteChannel) -> int:
    return int(channel.description.split(":")[1].split(" ")[0])


CASES: dict[str, Case] = {
    "sizes_round_trip_intact_and_in_order": case_sizes_round_trip_intact_and_in_order,
    "both_sides_sending_never_deadlock": case_both_sides_sending_never_deadlock,
    "orderly_close_delivers_everything_then_end_of_stream": case_orderly_close_delivers_everything_then_end_of_stream,
    "close_towards_a_peer_that_does_not_read_is_bounded": case_close_towards_a_peer_that_does_not_read_is_bounded,
    "peer_process_killed_is_detected": case_peer_process_killed_is_detected,
    "peer_queue_pair_gone_is_detected_by_completion_deadline": (
        case_peer_queue_pair_gone_is_detected_by_completion_deadline
    ),
    "garbage_handshake_is_refused_and_server_keeps_serving": case_garbage_handshake_is_refused_and_server_keeps_serving,
    "tls_control_connection_authenticates_both_parties": case_tls_control_connection_authenticates_both_parties,
    "closing_a_server_keeps_the_carriers_outgoing_channels": (
        case_closing_a_server_keeps_the_carriers_outgoing_channels
    ),
    "benchmark_script_runs_against_tcp": case_benchmark_script_runs_against_tcp,
}


async def peer_main(host: str, port: int) -> None:
    from fedgate.rdma.verbs_link import RdmaCarrier

    carrier = RdmaCarrier(replace(RdmaConfig()))
    channel = await carrier.connect(host, port, tls=None, server_hostname=None, timeout=30.0)
    await channel.send(b"hello")
    print("sent", flush=True)
    await asyncio.sleep(3600)


def main(argv: list[str]) -> int:
    faulthandler.enable()
    if argv[:1] == ["--peer"]:
        asyncio.run(peer_main(argv[1], int(argv[2])))
        return 0
    selected = argv or list(CASES)
    results: dict[str, str] = {}
    for name in selected:
        start = time.monotonic()
        print(f"case {name} ...", flush=True)
        try:
            asyncio.run(asyncio.wait_for(CASES[name](), K_CASE_TIMEOUT))
            results[name] = "ok"
        except BaseException as exc:  # report every failure, keep running the other cases
            results[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        print(f"case {name}: {results[name].splitlines()[0]} ({time.monotonic() - start:.1f} s)", flush=True)
    out = pathlib.Path(os.environ.get("FEDGATE_RIG_OUT", "."))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    failed = [n for n, r in results.items() if r != "ok"]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
