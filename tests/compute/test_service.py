"""The offload service over loopback gRPC with the Python client."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from fedgate.compute import fate
from fedgate.compute.client import HeClient
from fedgate.compute.config import ComputeConfig
from fedgate.compute.cpu import CpuBackend
from fedgate.compute.keystore import KeyTokenError, NoSecretKeyError, UnknownKeyError
from fedgate.compute.limbs import from_limbs, to_limbs
from fedgate.compute.paillier import decrypt_raw, generate_keypair
from fedgate.compute.service import serve_compute
from fedgate.errors import ConfigError, InvalidRequestError, StoreFullError

CONFIG = ComputeConfig(backend="cpu", workers=1, key_bits=1024, pool_size=16, max_keys=3, max_batch=1000)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _secret_forms(*values: int) -> list[bytes]:
    forms = []
    for v in values:
        size = (v.bit_length() + 7) // 8
        forms += [str(v).encode(), format(v, "x").encode(), v.to_bytes(size, "little"), v.to_bytes(size, "big")]
    return forms


def test_roundtrip_and_evaluation_over_grpc(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        server = await serve_compute(CONFIG, listen="127.0.0.1:0", backend=CpuBackend(CONFIG))
        try:
            async with HeClient(f"127.0.0.1:{server.port}", config=CONFIG) as he:
                pk = await he.generate_key(1024)
                ms = [0, 1, 5, pk.n - 1]
                cts = await he.encrypt(pk, to_limbs(ms, pk.plain_width))
                assert len(set(from_limbs(cts))) == 4
                doubled = await he.add(pk, cts, cts)
                tripled = await he.mul_scalar(pk, cts, to_limbs([3] * 4, pk.plain_width))
                assert from_limbs(await he.decrypt(pk, doubled)) == [2 * m % pk.n for m in ms]
                assert from_limbs(await he.decrypt(pk, tripled)) == [3 * m % pk.n for m in ms]
                plain = await he.encrypt(pk, to_limbs([7], pk.plain_width), obfuscate=False)
                assert from_limbs(plain) == [1 + 7 * pk.n]
                stats = await he.stats()
                assert stats["backend"] == "cpu" and stats["keys"] == 1 and stats["decrypted"] == 8
                # the secret key never leaves: scan every reply the service can give for its factors
                entry = server.service.keys.entry(pk.key_id)
                assert entry.secret is not None
                replies = [await he.call("PublicKey", {"key_id": pk.key_id}), stats]
                blob = repr(replies).encode() + repr(await he.call("Stats", {})).encode()
                text = "\n".join(r.getMessage() + repr(getattr(r, "fields", "")) for r in caplog.records)
                for form in [*_secret_forms(entry.secret.p, entry.secret.q), entry.token, entry.token.hex().encode()]:
                    assert form not in blob and form.decode("latin-1") not in text
                assert pk.key_id in text  # logs name keys by id
                assert await he.drop_key(pk)
                with pytest.raises(UnknownKeyError):
                    await he.encrypt(pk, to_limbs([1], pk.plain_width))
        finally:
            await server.stop(0)

    _run(scenario())


def test_public_only_keys_and_fate_keys() -> None:
    async def scenario() -> None:
        server = await serve_compute(CONFIG, listen="127.0.0.1:0", backend=CpuBackend(CONFIG))
        try:
            async with HeClient(f"127.0.0.1:{server.port}", config=CONFIG) as he:
                pk, sk = generate_keypair(1024)
                key_id = await he.register_public_key(pk)
                assert key_id == pk.key_id
                cts = await he.encrypt(pk, to_limbs([11, 12], pk.plain_width))
                assert [int(decrypt_raw(sk, c)) for c in from_limbs(cts)] == [11, 12]
                with pytest.raises(NoSecretKeyError):
                    await he.decrypt(pk, cts)  # the gateway does not hold this secret
                fpk = await he.register_fate_public_key(fate.dump_public_key(pk))
                assert fpk == pk
                assert await he.import_fate_secret_key(fate.dump_secret_key(sk)) == pk.key_id
                assert from_limbs(await he.decrypt(pk, cts)) == [11, 12]
        finally:
            await server.stop(0)

    _run(scenario())


def test_only_the_holder_of_a_secret_keys_token_decrypts_or_drops_it() -> None:
    # Any local process reaches the service, and every party that saw the public key can compute its
    # id: the id alone must not decrypt. The token goes to the client that generated or imported the key.
    async def scenario() -> None:
        server = await serve_compute(CONFIG, listen="127.0.0.1:0", backend=CpuBackend(CONFIG))
        target = f"127.0.0.1:{server.port}"
        try:
            async with HeClient(target, config=CONFIG) as owner, HeClient(target, config=CONFIG) as other:
                pk = await owner.generate_key(1024)
                assert await other.register_public_key(pk) == pk.key_id  # public use is open to all
                small = await other.encrypt(pk, to_limbs([4, 5], pk.plain_width))
                large = await other.encrypt(pk, to_limbs(range(1000), pk.plain_width))  # through shared memory
                for cts in (small, large):
                    with pytest.raises(KeyTokenError, match="no secret_token"):
                        await other.decrypt(pk, cts)
                raw = {"key_id": pk.key_id, "ciphertexts": small.data}
                with pytest.raises(KeyTokenError, match="wrong secret_token"):
                    await other.call("Decrypt", {**raw, "secret_token": bytes(32)})
                with pytest.raises(InvalidRequestError, match="secret_token"):
                    await other.call("Decrypt", {**raw, "secret_token": "not bytes"})
                with pytest.raises(KeyTokenError):
                    await other.drop_key(pk)
                with pytest.raises(KeyTokenError, match="holds no secret_token"):
                    other.secret_token(pk)
                assert from_limbs(await owner.decrypt(pk, small)) == [4, 5]
                other.set_secret_token(pk, owner.secret_token(pk))  # handed over on purpose
                assert from_limbs(await other.decrypt(pk, large)) == list(range(1000))
                assert await other.drop_key(pk)
                assert not await owner.drop_key(pk)

                # an imported secret key: the importer gets the token; importing it again gives the same
                pk2, sk2 = generate_keypair(1024)
                await other.register_public_key(pk2)
                assert await owner.import_fate_secret_key(fate.dump_secret_key(sk2)) == pk2.key_id
                cts = await other.encrypt(pk2, to_limbs([9], pk2.plain_width))
                with pytest.raises(KeyTokenError):
                    await other.decrypt(pk2, cts)
                await other.import_fate_secret_key(fate.dump_secret_key(sk2))
                assert other.secret_token(pk2) == owner.secret_token(pk2)
                assert from_limbs(await owner.decrypt(pk2, cts)) == [9]
        finally:
            await server.stop(0)

    _run(scenario())


def test_bad_requests_fail_with_status() -> None:
    async def scenario() -> None:
        server = await serve_compute(CONFIG, listen="127.0.0.1:0", backend=CpuBackend(CONFIG))
        try:
            async with HeClient(f"127.0.0.1:{server.port}", config=CONFIG) as he:
                pk = await he.generate_key(1024)
                with pytest.raises(InvalidRequestError, match="limb"):
                    await he.call("Encrypt", {"key_id": pk.key_id, "plaintexts": b"\x01\x02\x03"})
                with pytest.raises(InvalidRequestError, match="key_id"):
                    await he.call("Encrypt", {"plaintexts": b""})
                with pytest.raises(InvalidRequestError, match="max_batch"):
                    await he.encrypt(pk, to_limbs([1] * 1001, pk.plain_width))
                with pytest.raises(InvalidRequestError):
                    await he.call("GenerateKey", {"bits": 512})
                rpc = he._channel.unary_unary(
                    "/fedgate.compute.HeOffload/Stats", request_serializer=None, response_deserializer=None
                )
                with pytest.raises(Exception, match="malformed"):
                    await rpc(b"\xc1")
                await he.generate_key(1024)
                await he.generate_key(1024)
                with pytest.raises(StoreFullError):
                    await he.generate_key(1024)
        finally:
            await server.stop(0)

    _run(scenario())


def test_serve_compute_builds_its_backend_and_refuses_a_taken_port() -> None:
    async def scenario() -> None:
        server = await serve_compute(CONFIG, listen="127.0.0.1:0")
        try:
            assert server.service.backend.name == "cpu"
            with pytest.raises(ConfigError, match="cannot listen"):
                await serve_compute(CONFIG, listen=f"127.0.0.1:{server.port}", backend=CpuBackend(CONFIG))
        finally:
            await server.stop(0)

    _run(scenario())
