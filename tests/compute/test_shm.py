"""Shared-memory payloads between a same-host client and the offload service."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from typing import Any

import pytest

from fedgate.compute import shm
from fedgate.compute.client import HeClient, _same_host
from fedgate.compute.config import ComputeConfig
from fedgate.compute.cpu import CpuBackend
from fedgate.compute.limbs import LimbBuffer, from_limbs, to_limbs
from fedgate.compute.service import serve_compute
from fedgate.errors import InvalidRequestError

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm here")

CONFIG = ComputeConfig(backend="cpu", workers=1, key_bits=1024, max_batch=5000)
K_BATCH = 1200  # 1200 x 256-byte ciphertexts: above shm.K_SHM_MIN_BYTES


def _ours() -> set[str]:
    return {name for name in os.listdir(shm.K_SHM_DIR) if name.startswith("fedgate-he-")}


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_same_host_targets() -> None:
    assert _same_host("127.0.0.1:9390") and _same_host("localhost:1") and _same_host("[::1]:5")
    assert _same_host("unix:/run/fedgate/he.sock") and _same_host("ipv4:127.0.0.2:80")
    assert not _same_host("10.0.0.5:9390") and not _same_host("gateway.example:9390")


@pytest.mark.parametrize("server_shm", [True, False], ids=["gateway-accepts", "gateway-refuses"])
def test_batches_through_shared_memory_match_inline(server_shm: bool) -> None:
    before = _ours()
    config = dataclasses.replace(CONFIG, shared_memory=server_shm)

    async def scenario() -> None:
        server = await serve_compute(config, listen="127.0.0.1:0", backend=CpuBackend(config))
        try:
            target = f"127.0.0.1:{server.port}"
            async with HeClient(target, config=config) as he, HeClient(target, shared_memory=False) as inline:
                assert he.transport == "shared memory" and inline.transport == "inline"
                pk = await he.generate_key(1024)
                ms = [secrets.randbelow(pk.n) for _ in range(K_BATCH)]
                cts = await he.encrypt(pk, to_limbs(ms, pk.plain_width))
                assert he.transport == ("shared memory" if server_shm else "inline")
                assert len(_ours() - before) == (1 if server_shm else 0)  # one arena, reused
                assert from_limbs(await he.decrypt(pk, cts)) == ms
                assert await he.add(pk, cts, cts) == await inline.add(pk, cts, cts)
                big = LimbBuffer(cts.data * 4, pk.cipher_width)  # 3.7 MB in and out: a larger arena
                assert await he.add(pk, big, big) == await inline.add(pk, big, big)
                ks = to_limbs([secrets.randbits(64) for _ in range(K_BATCH)], pk.plain_width)
                assert await he.mul_scalar(pk, cts, ks) == await inline.mul_scalar(pk, cts, ks)
                small = await he.encrypt(pk, to_limbs([3], pk.plain_width))  # below the threshold: inline
                assert from_limbs(await he.decrypt(pk, small)) == [3]
                # concurrent calls take separate arenas
                sums = await asyncio.gather(*(he.add(pk, cts, cts) for _ in range(3)))
                assert all(s == sums[0] for s in sums)
        finally:
            await server.stop(0)

    _run(scenario())
    assert _ours() == before  # the client removed its files


def test_service_checks_what_a_client_names() -> None:
    async def scenario() -> None:
        server = await serve_compute(CONFIG, listen="127.0.0.1:0", backend=CpuBackend(CONFIG))
        arena = shm.Arena(1 << 16)
        try:
            async with HeClient(f"127.0.0.1:{server.port}", shared_memory=False) as he:
                pk = await he.generate_key(1024)
                base = {"key_id": pk.key_id, "shm_out": [2112, 1024], "shm_key": arena.token}
                h = shm.K_HEADER
                bad: list[dict[str, Any]] = [
                    {"shm": "../../etc/passwd", "shm_in": {"a": [h, 1024], "b": [h, 1024]}},
                    {"shm": "fedgate-he-" + "0" * 32, "shm_in": {"a": [h, 1024], "b": [h, 1024]}},  # no such file
                    {"shm": arena.name, "shm_in": {"a": [h, 1024], "b": [1 << 16, 1024]}},  # outside
                    {"shm": arena.name, "shm_in": {"a": [0, 1024], "b": [h, 1024]}},  # the token's header
                    {"shm": arena.name, "shm_in": {"a": [-1, 1024], "b": [h, 1024]}},
                    {"shm": arena.name, "shm_in": {"a": [h, 1024], "b": [h, 1024]}, "shm_out": [1 << 16, 1]},
                    {"shm": arena.name, "shm_in": {"a": [h, 1024], "b": [h, 1024]}, "shm_out": [2112, 8]},  # too small
                    {"shm": arena.name, "shm_in": [[h, 256]]},
                    {"shm": arena.name, "shm_in": {"a": [h, 1024], "b": [h, 1024]}, "shm_key": b"x" * 16},
                    {"shm": arena.name, "shm_in": {"a": [h, 1024], "b": [h, 1024]}, "shm_key": None},
                ]
                for fields in bad:
                    with pytest.raises(InvalidRequestError):
                        await he.call("Add", {**base, **fields})
                ok = await he.call("Add", {**base, "shm": arena.name, "shm_in": {"a": [h, 1024], "b": [h, 1024]}})
                assert ok == {"shm_reply": ["ciphertexts", 1024]}  # four 1024-bit ciphertexts of 0 + 0
                assert arena.map[2112:3136] == bytes(1024)
        finally:
            arena.close()
            await server.stop(0)

    _run(scenario())


def test_arena_pool_reuses_and_grows() -> None:
    pool = shm.ArenaPool()
    a = pool.take(1000)
    assert a.size >= 1 << 20 and oct(os.stat(a.path).st_mode & 0o777) == "0o600"
    pool.give_back(a)
    assert pool.take(1000) is a
    pool.give_back(a)
    big = pool.take(4 << 20)
    assert big is not a and big.size >= 4 << 20 and not os.path.exists(a.path)
    req = shm.pack_request(big, {"key_id": "k", "x": b"hello"}, ["x"], 10)
    h = shm.K_HEADER
    assert req == {"key_id": "k", "shm": big.name,
                   "shm_key": big.token, "shm_in": {"x": [h, 5]}, "shm_out": [h + 5, 10]}
    assert big.map[: shm.K_TOKEN_BYTES] == big.token and len(set(big.token)) > 1
    big.map[h + 5 : h + 8] = b"xyz"
    assert shm.read_reply(big, req, {"shm_reply": ["c", 3]}) == {"c": b"xyz"}
    with pytest.raises(InvalidRequestError):
        shm.read_reply(big, req, {"shm_reply": ["c", 11]})
    pool.give_back(big)
    exact = pool.take(big.size)  # payload of exactly an arena's size: a bigger arena, the header included
    assert exact.size >= big.size + shm.K_HEADER and not os.path.exists(big.path)
    with pytest.raises(ValueError):
        shm.pack_request(exact, {"x": bytes(exact.size)}, ["x"], 0)
    fit = shm.pack_request(exact, {"x": bytes(big.size - 10)}, ["x"], 10)
    assert fit["shm_out"] == [shm.K_HEADER + big.size - 10, 10]
    pool.give_back(exact)
    pool.close()
    assert not os.path.exists(exact.path)
    assert not os.path.exists(big.path)


def test_service_keeps_mappings_only_while_the_files_exist() -> None:
    cache = shm.SegmentCache(limit=1)
    a, b = shm.Arena(1 << 16), shm.Arena(1 << 16)
    try:
        a.map[:2] = b"hi"
        with cache.segment(a.name) as seg:
            first = seg
            assert seg[:2] == b"hi"
            with cache.segment(a.name) as again:  # concurrent use of one segment shares the mapping
                assert again is seg
        with cache.segment(a.name) as seg:
            assert seg is first  # kept between calls
        with cache.segment(b.name):
            pass
        assert len(cache) == 1  # limit: a was evicted
        b.close()  # the client let go: the next lookup drops the mapping
        with cache.segment(a.name) as seg:
            assert seg[:2] == b"hi"
        assert len(cache) == 1
        with pytest.raises(InvalidRequestError), cache.segment(b.name):
            pass
        with pytest.raises(InvalidRequestError), cache.segment(123):
            pass
        cache.close()
        assert len(cache) == 0
    finally:
        a.close()
        b.close()
