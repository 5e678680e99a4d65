"""The OSX front on real gRPC servers on 127.0.0.1: queue semantics, forwarding, errors people can act on."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import grpc.aio
import pytest

from fedgate.proxy.osx_client import K_CODE_OK, K_CODE_TIMEOUT, OsxQueueClient
from fedgate.proxy.protos import osx_pb2, osx_pb2_grpc
from tests.proxy.gateways import build, free_port, front_of, gateway_data, running

SESSION = "202611271200000000001"
TOPIC = f"{SESSION}-guest-9999-host-10000-model"


def headers(
    target: str = "10000", source: str = "9999", source_header: str = "x-ptp-from-node-id"
) -> list[tuple[str, str]]:
    return [("x-ptp-session-id", SESSION), ("x-ptp-target-node-id", target), (source_header, source),
            ("x-ptp-tech-provider-code", "FATE"), ("x-ptp-trace-id", "t")]


def two_gateways(tmp_path: pathlib.Path) -> tuple[dict[str, object], dict[str, object]]:
    b = gateway_data(tmp_path, "10000", {})
    a = gateway_data(tmp_path, "9999", {"10000": {"default": [
        {"ip": "127.0.0.1", "port": front_of(b), "transport": "grpc"}]}})
    return a, b


def test_push_through_two_gateways_then_pop_at_the_destination(tmp_path: pathlib.Path) -> None:
    a, b = two_gateways(tmp_path)

    async def main() -> None:
        async with running(build(b)), running(build(a)):
            pusher = OsxQueueClient(f"127.0.0.1:{front_of(a)}", party="9999")
            popper = OsxQueueClient(f"127.0.0.1:{front_of(b)}", party="10000")
            payloads = [osx_pb2.Message(msgId=str(i), head=b"{}", body=bytes([i]) * (i * 1000)).SerializeToString()
                        for i in range(20)]
            for p in payloads:
                await pusher.push(session=SESSION, topic=TOPIC, target="10000", payload=p)
            got = [await popper.pop(session=SESSION, topic=TOPIC, timeout=5) for _ in payloads]
            assert got == payloads  # unchanged bytes, FIFO
            assert await popper.pop(session=SESSION, topic=TOPIC, timeout=0.2) is None
            await pusher.aclose()
            await popper.aclose()

    asyncio.run(main())


def test_parked_pops_are_answered_in_order_and_expire_with_601(tmp_path: pathlib.Path) -> None:
    _, b = two_gateways(tmp_path)

    async def main() -> None:
        async with running(build(b)):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_of(b)}")
            stub = osx_pb2_grpc.PrivateTransferTransportStub(channel)
            pop_md = [("x-ptp-session-id", SESSION), ("x-ptp-from-node-id", "10000")]
            parked = [asyncio.ensure_future(stub.pop(osx_pb2.PopInbound(topic=TOPIC, timeout=36_000_000),
                                                     metadata=pop_md)) for _ in range(300)]
            await asyncio.sleep(0.3)
            for i in range(300):
                reply = await stub.push(osx_pb2.PushInbound(topic=TOPIC, payload=b"%d" % i),
                                        metadata=headers(target="10000", source="9999"))
                assert reply.code == K_CODE_OK
            answers = await asyncio.gather(*parked)
            assert sorted(int(r.payload) for r in answers) == list(range(300))
            expired = await stub.pop(osx_pb2.PopInbound(topic=TOPIC, timeout=100), metadata=pop_md)
            assert expired.code == K_CODE_TIMEOUT
            await channel.close(None)

    asyncio.run(main())


def test_source_header_of_the_osx_broker_is_accepted_and_release_drops_the_session(tmp_path: pathlib.Path) -> None:
    _, b = two_gateways(tmp_path)

    async def main() -> None:
        async with running(build(b)) as gw:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_of(b)}")
            stub = osx_pb2_grpc.PrivateTransferTransportStub(channel)
            md = headers(target="10000", source="9999", source_header="x-ptp-source-node-id")
            for topic in ("a", "b"):
                await stub.push(osx_pb2.PushInbound(topic=topic, payload=b"x"), metadata=md)
            peek = await stub.peek(osx_pb2.PeekInbound(topic="a"), metadata=md)
            assert peek.code == K_CODE_OK and peek.payload == b"x"
            await stub.release(osx_pb2.ReleaseInbound(topic=""), metadata=md)
            assert gw.store is not None and gw.store.statistics().queued_messages == 0
            await channel.close(None)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("routes", "md", "code", "text"),
    [
        ({}, headers(target="777"), grpc.StatusCode.NOT_FOUND, "777"),
        ({}, [("x-ptp-session-id", SESSION), ("x-ptp-from-node-id", "9999")], grpc.StatusCode.INVALID_ARGUMENT,
         "x-ptp-target-node-id"),
        ({"10000": {"default": [{"ip": "127.0.0.1", "port": 1, "transport": "grpc"}]}}, headers(),
         grpc.StatusCode.UNAVAILABLE, "127.0.0.1:1"),
    ],
    ids=["no-route", "missing-header", "peer-down"],
)
def test_failed_push_fails_the_rpc_with_a_status_naming_the_cause(
    tmp_path: pathlib.Path, routes: dict[str, object], md: list[tuple[str, str]], code: grpc.StatusCode, text: str
) -> None:
    a = gateway_data(tmp_path, "9999", routes, front={"forward_timeout_s": 3.0})

    async def main() -> None:
        async with running(build(a)):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_of(a)}")
            stub = osx_pb2_grpc.PrivateTransferTransportStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.push(osx_pb2.PushInbound(topic=TOPIC, payload=b"x"), metadata=md)
            assert info.value.code() == code
            assert text in (info.value.details() or "")
            await channel.close(None)

    asyncio.run(main())


def test_oversize_push_is_refused_with_resource_exhausted(tmp_path: pathlib.Path) -> None:
    a = gateway_data(tmp_path, "9999", {}, front={"max_message_bytes": 100_000})

    async def main() -> None:
        async with running(build(a)) as gw:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_of(a)}",
                                                options=[("grpc.max_send_message_length", 10_000_000)])
            stub = osx_pb2_grpc.PrivateTransferTransportStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.push(osx_pb2.PushInbound(topic=TOPIC, payload=b"x" * 200_000),
                                metadata=headers(target="9999"))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert gw.store is not None and gw.store.statistics().queued_messages == 0
            await channel.close(None)

    asyncio.run(main())


def test_failover_to_the_second_endpoint(tmp_path: pathlib.Path) -> None:
    b = gateway_data(tmp_path, "10000", {})
    a = gateway_data(tmp_path, "9999", {"10000": {"default": [
        {"ip": "127.0.0.1", "port": free_port(), "transport": "grpc", "weight": 100},
        {"ip": "127.0.0.1", "port": front_of(b), "transport": "grpc", "weight": 1}]}})

    async def main() -> None:
        async with running(build(b)) as gb, running(build(a)) as ga:
            client = OsxQueueClient(f"127.0.0.1:{front_of(a)}", party="9999")
            for _ in range(5):
                await client.push(session=SESSION, topic=TOPIC, target="10000", payload=b"m")
            assert gb.store is not None and gb.store.statistics().queued_messages == 5
            assert ga.router is not None
            stats = {e.address: e for e in ga.router.statistics().endpoints}
            assert any(not e.healthy for e in stats.values())
            await client.aclose()

    asyncio.run(main())


def test_osx_hop_over_mutual_tls_and_a_clear_error_when_the_certificate_is_not_trusted(tmp_path: pathlib.Path) -> None:
    from fedgate.proxy.certs import issue_party, load_or_create_ca

    ca = load_or_create_ca(tmp_path / "ca")
    other_ca = load_or_create_ca(tmp_path / "other-ca")
    b_cert, b_key = issue_party(tmp_path / "ca", "10000", ca=ca)
    a_cert, a_key = issue_party(tmp_path / "ca", "9999", ca=ca)
    x_cert, x_key = issue_party(tmp_path / "other-ca", "9999", ca=other_ca)
    b = gateway_data(tmp_path, "10000", {}, tls={"front": True, "ca_file": str(tmp_path / "ca" / "ca.pem"),
                                                  "cert_file": str(b_cert), "key_file": str(b_key)})

    def sender(name: str, cert: pathlib.Path, key: pathlib.Path) -> dict[str, object]:
        return gateway_data(tmp_path / name, "9999", {"10000": {"default": [{
            "ip": "127.0.0.1", "port": front_of(b), "transport": "grpc", "useSSL": True,
            "caFile": str(tmp_path / "ca" / "ca.pem"), "certChainFile": str(cert), "privateKeyFile": str(key)}]}},
            front={"forward_timeout_s": 5.0})

    good, bad = sender("good", a_cert, a_key), sender("bad", x_cert, x_key)

    async def main() -> None:
        async with running(build(b)) as gb, running(build(good)), running(build(bad)):
            client = OsxQueueClient(f"127.0.0.1:{front_of(good)}", party="9999")
            await client.push(session=SESSION, topic=TOPIC, target="10000", payload=b"over mTLS")
            await client.aclose()
            assert gb.store is not None and gb.store.statistics().queued_messages == 1
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_of(bad)}")
            stub = osx_pb2_grpc.PrivateTransferTransportStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.push(osx_pb2.PushInbound(topic=TOPIC, payload=b"x"), metadata=headers())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"127.0.0.1:{front_of(b)} (TLS)" in (info.value.details() or "")
            await channel.close(None)
            assert gb.store.statistics().queued_messages == 1

    asyncio.run(main())
