"""The rollsite front: push streams hop by hop, unaryCall to FATE-Flow with the caller's deadline, route query."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from fedgate.proxy.protos import proxy_pb2, proxy_pb2_grpc, transfer_pb2
from tests.proxy.gateways import build, free_port, front_of, gateway_data, running


def packet(i: int, *, dst: str = "10000", via_header: bool = False) -> proxy_pb2.Packet:
    rs = transfer_pb2.RollSiteHeader(rollSiteSessionId="sess", name="obj", tag="0", srcRole="guest",
                                     srcPartyId="9999", dstRole="host", dstPartyId=dst if via_header else "",
                                     dataType="object", batchSeq=i)
    meta = proxy_pb2.Metadata(
        src=proxy_pb2.Topic(name="obj", partyId="9999", role="guest"),
        dst=proxy_pb2.Topic(name="0", partyId="" if via_header else dst, role="host"),
        ext=rs.SerializeToString(), seq=i,
    )
    return proxy_pb2.Packet(header=meta, body=proxy_pb2.Data(key=str(i), value=bytes([i % 256]) * 100_000))


class FateFlow(proxy_pb2_grpc.DataTransferServiceServicer):
    """Stands in for the FATE-Flow server behind the fateflow route: answers unaryCall, slowly when asked."""

    async def unaryCall(
        self, request: proxy_pb2.Packet, context: grpc.aio.ServicerContext[object, object]
    ) -> proxy_pb2.Packet:
        if request.body.key == "slow":
            await asyncio.sleep(5)
        return proxy_pb2.Packet(header=request.header, body=proxy_pb2.Data(key="reply", value=request.body.value[::-1]))


@pytest.mark.parametrize("via_header", [False, True], ids=["dst-topic", "rollsite-header"])
def test_push_stream_relayed_hop_by_hop_and_pulled_at_the_destination(tmp_path: pathlib.Path, via_header: bool) -> None:
    b = gateway_data(tmp_path, "10000", {})
    a = gateway_data(tmp_path, "9999", {"10000": {"default": [
        {"ip": "127.0.0.1", "port": front_of(b), "transport": "grpc"}]}})

    async def main() -> None:
        async with running(build(b)), running(build(a)):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_of(a)}")
            stub = proxy_pb2_grpc.DataTransferServiceStub(channel)

            async def stream() -> AsyncIterator[proxy_pb2.Packet]:
                for i in range(10):
                    yield packet(i, via_header=via_header)

            reply = await stub.push(stream())
            assert reply.seq == 10
            b_channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_of(b)}")
            pulled = [p async for p in proxy_pb2_grpc.DataTransferServiceStub(b_channel).pull(packet(0).header)]
            assert [p.body.key for p in pulled] == [str(i) for i in range(10)]
            assert pulled[3].body.value == bytes([3]) * 100_000
            await channel.close(None)
            await b_channel.close(None)

    asyncio.run(main())


def test_unary_call_goes_to_fateflow_and_honours_the_deadline(tmp_path: pathlib.Path) -> None:
    flow_port = free_port()
    a = gateway_data(tmp_path, "9999", {"9999": {"fateflow": [{"ip": "127.0.0.1", "port": flow_port}]}})

    async def main() -> None:
        flow = grpc.aio.server()
        proxy_pb2_grpc.add_DataTransferServiceServicer_to_server(FateFlow(), flow)  # type: ignore[abstract]
        flow.add_insecure_port(f"127.0.0.1:{flow_port}")
        await flow.start()
        async with running(build(a)):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_of(a)}")
            stub = proxy_pb2_grpc.DataTransferServiceStub(channel)
            request = proxy_pb2.Packet(header=proxy_pb2.Metadata(dst=proxy_pb2.Topic(partyId="9999", role="fateflow")),
                                       body=proxy_pb2.Data(key="k", value=b"abc"))
            reply = await stub.unaryCall(request, timeout=5)
            assert reply.body.value == b"cba"
            request.body.key = "slow"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.unaryCall(request, timeout=0.5)
            assert info.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            await channel.close(None)
        await flow.stop(None)

    asyncio.run(main())


def test_route_query_answers_from_the_table_and_names_missing_routes(tmp_path: pathlib.Path) -> None:
    a = gateway_data(tmp_path, "9999", {"10000": {"default": [{"ip": "10.1.2.3", "port": 9370}]}})

    async def main() -> None:
        async with running(build(a)):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_of(a)}")
            stub = proxy_pb2_grpc.RouteServiceStub(channel)
            endpoint = await stub.query(proxy_pb2.Topic(partyId="10000", role="host"))
            assert (endpoint.ip, endpoint.port) == ("10.1.2.3", 9370)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.query(proxy_pb2.Topic(partyId="4242", role="host"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "4242" in (info.value.details() or "")
            await channel.close(None)

    asyncio.run(main())
