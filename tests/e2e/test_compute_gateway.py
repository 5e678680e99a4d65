"""The gateway serves the HE offload service when ``[compute] enabled``; workers use it over gRPC."""

from __future__ import annotations

import asyncio
import pathlib

from fedgate.compute.client import HeClient
from fedgate.compute.config import ComputeConfig
from fedgate.compute.limbs import from_limbs, to_limbs
from tests.proxy.gateways import build, free_port, gateway_data, running


def test_gateway_offers_paillier_offload(tmp_path: pathlib.Path) -> None:
    port = free_port()
    compute = {"enabled": True, "backend": "cpu", "workers": 1, "key_bits": 1024, "pool_size": 8,
               "listen": f"127.0.0.1:{port}"}
    data = gateway_data(tmp_path, "9999", {}, compute=compute)

    async def main() -> None:
        async with running(build(data)):
            config = ComputeConfig(backend="cpu", key_bits=1024)
            async with HeClient(f"127.0.0.1:{port}", config=config) as he:
                pk = await he.generate_key(1024)
                values = [0, 7, 123456789]
                cts = await he.encrypt(pk, to_limbs(values, pk.plain_width))
                total = await he.add(pk, cts, cts)
                assert from_limbs(await he.decrypt(pk, total)) == [2 * v for v in values]
                assert (await he.stats())["backend"] == "cpu"

    asyncio.run(main())
