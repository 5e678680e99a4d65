"""The HE offload gRPC service: the party's own workers call the gateway for batch Paillier.

Wire format: gRPC service ``fedgate.compute.HeOffload`` with msgpack-encoded maps as messages (no
protobuf stubs to generate). Numbers travel as fixed-width little-endian limb bytes, the backends'
own layout, so a call costs no per-element conversion on the way in or out.

    GenerateKey        {bits}                                  -> {key_id, n, secret_token}
    RegisterPublicKey  {n} | {fate_pk}                         -> {key_id}
    ImportSecretKey    {fate_sk}                               -> {key_id, secret_token} (into the gateway only)
    PublicKey          {key_id}                                -> {key_id, n, fate_pk}
    Encrypt            {key_id, plaintexts, obfuscate=true}    -> {ciphertexts}
    Decrypt            {key_id, secret_token, ciphertexts}     -> {plaintexts}
    Add                {key_id, a, b}                          -> {ciphertexts}
    MulScalar          {key_id, ciphertexts, scalars}          -> {ciphertexts}
    DropKey            {key_id, secret_token (for a secret)}   -> {dropped}
    Stats              {}                                      -> {backend, device, keys, encrypted, ...}

Same-host clients may hand the large byte fields over in shared memory instead (``shm``, ``shm_in``,
``shm_out`` request fields, ``shm_reply`` in the answer; :mod:`fedgate.compute.shm`, on by default,
``compute.shared_memory = false`` switches it off).

``n`` is big-endian-free: little-endian bytes of the modulus. Plaintexts are residues mod n of
``pk.plain_width`` limbs, ciphertexts residues mod n^2 of ``pk.cipher_width`` limbs.

Rules of this module:

1. Secret keys never leave the gateway: no response carries one; log lines carry key ids and counts
   only, never request or response bodies (nor tokens).
2. Decrypt and dropping a secret key take the key's ``secret_token``, given only to the caller that
   generated or imported the key (:mod:`fedgate.compute.keystore` rule 3); a missing or wrong one fails
   with PERMISSION_DENIED.
3. A :class:`~fedgate.errors.FedgateError` fails the RPC with its ``grpc_status``; a malformed
   message fails with INVALID_ARGUMENT; nothing else escapes.
4. The arithmetic runs in worker threads (the cpu backend fans out to its process pool from there),
   so the event loop keeps serving; randomness pools are refilled in the background after encrypts.

For the integrator: ``server = await serve_compute(config.compute)`` starts it on
``config.compute.listen``; ``await server.stop(grace)`` stops it and closes the backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import msgpack

from fedgate.compute import fate, shm
from fedgate.compute.api import HeBackend, create_backend
from fedgate.compute.config import ComputeConfig
from fedgate.compute.cpu import CpuBackend
from fedgate.compute.keystore import KeyStore
from fedgate.compute.limbs import LimbBuffer
from fedgate.compute.paillier import PublicKey
from fedgate.errors import ConfigError, FedgateError, InvalidRequestError

__all__ = ["K_SERVICE", "ComputeServer", "HeService", "add_to_server", "serve_compute", "server_options"]

log = logging.getLogger("fedgate.compute")

K_SERVICE = "fedgate.compute.HeOffload"
K_HEADROOM = 1 << 20  # bytes of slack on top of the largest batch in a message
K_MAX_FRAME = (1 << 24) - 1  # bytes, the HTTP/2 maximum frame size
K_LOOKAHEAD = 64 << 20  # bytes a stream may buffer ahead

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def server_options(config: ComputeConfig, *, key_bits: int = 4096) -> list[tuple[str, int]]:
    """gRPC options that let a ``max_batch`` of ciphertexts through (both sides must use them)."""
    size = config.max_batch * 2 * (key_bits // 8) * 2 + K_HEADROOM
    size = min(size, 2**31 - 1)
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        # batches are megabytes: big HTTP/2 frames and a deep stream window cut the per-call overhead
        ("grpc.http2.max_frame_size", K_MAX_FRAME),
        ("grpc.http2.lookahead_bytes", K_LOOKAHEAD),
    ]


def _field(req: dict[str, Any], name: str, kind: type) -> Any:
    value = req.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise InvalidRequestError(f"field {name!r} must be {kind.__name__}")
    return value


def _token(req: dict[str, Any]) -> bytes:
    token = req.get("secret_token", b"")
    if not isinstance(token, bytes):
        raise InvalidRequestError("field 'secret_token' must be bytes")
    return token


class HeService:
    """The handlers, over one backend and one key store."""

    def __init__(self, config: ComputeConfig, backend: HeBackend) -> None:
        self._config = config
        self.config = config
        self.backend = backend
        self.segments = shm.SegmentCache()
        self.keys = KeyStore(max_keys=config.max_keys)
        self._refilling: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.handlers: dict[str, Handler] = {
            "GenerateKey": self.generate_key,
            "RegisterPublicKey": self.register_public_key,
            "ImportSecretKey": self.import_secret_key,
            "PublicKey": self.public_key,
            "Encrypt": self.encrypt,
            "Decrypt": self.decrypt,
            "Add": self.add,
            "MulScalar": self.mul_scalar,
            "DropKey": self.drop_key,
            "Stats": self.stats,
        }

    # -- helpers ----------------------------------------------------------------------------------
    def _buffer(self, req: dict[str, Any], name: str, width: int) -> LimbBuffer:
        buf = LimbBuffer(_field(req, name, bytes), width)
        if buf.count > self._config.max_batch:
            raise InvalidRequestError(f"batch of {buf.count} exceeds compute.max_batch={self._config.max_batch}")
        return buf

    def _key(self, req: dict[str, Any]) -> PublicKey:
        return self.keys.public(_field(req, "key_id", str))

    def _refill_later(self, pk: PublicKey) -> None:
        backend = self.backend
        if not isinstance(backend, CpuBackend) or self._config.pool_size <= 0 or pk.key_id in self._refilling:
            return
        entry = self.keys.entry(pk.key_id)
        self._refilling.add(pk.key_id)

        async def refill() -> None:
            try:
                await asyncio.to_thread(backend.refill_pool, pk, sk=entry.secret)
            except FedgateError as exc:
                log.warning("randomness pool refill failed", extra={"fields": {"key_id": pk.key_id, "error": str(exc)}})
            finally:
                self._refilling.discard(pk.key_id)

        task = asyncio.get_running_loop().create_task(refill())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- handlers ---------------------------------------------------------------------------------
    async def generate_key(self, req: dict[str, Any]) -> dict[str, Any]:
        bits = req.get("bits", self._config.key_bits)
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise InvalidRequestError("field 'bits' must be int")
        entry = await asyncio.to_thread(self.keys.generate, bits)
        pk = entry.public
        log.info("HE key generated", extra={"fields": {"key_id": pk.key_id, "bits": pk.bits}})
        self._refill_later(pk)
        return {"key_id": pk.key_id, "n": pk.n.to_bytes(pk.plain_width * 4, "little"), "secret_token": entry.token}

    async def register_public_key(self, req: dict[str, Any]) -> dict[str, Any]:
        if "fate_pk" in req:
            pk = fate.load_public_key(_field(req, "fate_pk", bytes))
        else:
            pk = PublicKey(int.from_bytes(_field(req, "n", bytes), "little"))
        key_id = self.keys.add_public(pk)
        log.info("HE public key registered", extra={"fields": {"key_id": key_id, "bits": pk.bits}})
        return {"key_id": key_id}

    async def import_secret_key(self, req: dict[str, Any]) -> dict[str, Any]:
        sk = fate.load_secret_key(_field(req, "fate_sk", bytes))
        entry = self.keys.add_secret(sk)
        key_id = entry.public.key_id
        log.info("HE secret key imported", extra={"fields": {"key_id": key_id, "bits": sk.public.bits}})
        return {"key_id": key_id, "secret_token": entry.token}

    async def public_key(self, req: dict[str, Any]) -> dict[str, Any]:
        pk = self._key(req)
        n = pk.n.to_bytes(pk.plain_width * 4, "little")
        return {"key_id": pk.key_id, "n": n, "fate_pk": fate.dump_public_key(pk)}

    async def encrypt(self, req: dict[str, Any]) -> dict[str, Any]:
        pk = self._key(req)
        entry = self.keys.entry(pk.key_id)
        obfuscate = req.get("obfuscate", True)
        if not isinstance(obfuscate, bool):
            raise InvalidRequestError("field 'obfuscate' must be bool")
        pts = self._buffer(req, "plaintexts", pk.plain_width)
        out = await asyncio.to_thread(self.backend.encrypt, pk, pts, sk=entry.secret, obfuscate=obfuscate)
        self._refill_later(pk)
        return {"ciphertexts": out.data}

    async def decrypt(self, req: dict[str, Any]) -> dict[str, Any]:
        key_id = _field(req, "key_id", str)
        sk = self.keys.secret(key_id, _token(req))
        cts = self._buffer(req, "ciphertexts", sk.public.cipher_width)
        out = await asyncio.to_thread(self.backend.decrypt, sk, cts)
        return {"plaintexts": out.data}

    async def add(self, req: dict[str, Any]) -> dict[str, Any]:
        pk = self._key(req)
        a = self._buffer(req, "a", pk.cipher_width)
        b = self._buffer(req, "b", pk.cipher_width)
        out = await asyncio.to_thread(self.backend.add, pk, a, b)
        return {"ciphertexts": out.data}

    async def mul_scalar(self, req: dict[str, Any]) -> dict[str, Any]:
        pk = self._key(req)
        cts = self._buffer(req, "ciphertexts", pk.cipher_width)
        ks = self._buffer(req, "scalars", pk.plain_width)
        out = await asyncio.to_thread(self.backend.mul_scalar, pk, cts, ks)
        return {"ciphertexts": out.data}

    async def drop_key(self, req: dict[str, Any]) -> dict[str, Any]:
        key_id = _field(req, "key_id", str)
        if key_id not in self.keys:
            return {"dropped": False}
        pk = self.keys.public(key_id)
        self.keys.drop(key_id, _token(req))  # checks the token of a secret key before anything is forgotten
        forget = getattr(self.backend, "forget", None)
        if callable(forget):
            forget(pk)
        return {"dropped": True}

    async def stats(self, req: dict[str, Any]) -> dict[str, Any]:
        s = self.backend.statistics()
        return {
            "backend": s.name,
            "device": s.device,
            "keys": len(self.keys),
            "encrypted": s.encrypted,
            "decrypted": s.decrypted,
            "evaluated": s.evaluated,
            "pool_served": s.pool_served,
        }

    async def aclose(self) -> None:
        """Cancel background refills and close the backend."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.segments.close()
        await asyncio.to_thread(self.backend.close)


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidRequestError(f"malformed request: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidRequestError("a request must be a map")
    return obj


def _pack(obj: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


async def _via_shared_memory(handler: Handler, req: dict[str, Any], cache: shm.SegmentCache | None) -> dict[str, Any]:
    if cache is None:
        raise InvalidRequestError(f"{shm.K_DISABLED} is switched off on this gateway (compute.shared_memory)")
    with cache.segment(req["shm"]) as segment:
        inner, where = shm.unpack_request(segment, req)
        return shm.write_reply(segment, where, await handler(inner))


def _rpc(name: str, handler: Handler, segments: shm.SegmentCache | None) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            req = _unpack(request)
            if "shm" in req:  # a same-host client handed the payloads over in shared memory (shm.py)
                return _pack(await _via_shared_memory(handler, req, segments))
            return _pack(await handler(req))
        except FedgateError as exc:
            log.info("HE call failed", extra={"fields": {"method": name, "error": type(exc).__name__}})
            await context.abort(grpc.StatusCode[exc.grpc_status], str(exc))
            raise  # unreachable: abort raises

    return grpc.unary_unary_rpc_method_handler(call)


def add_to_server(server: grpc.aio.Server, service: HeService) -> None:
    """Register the HeOffload methods on an existing grpc.aio server."""
    segments = service.segments if service.config.shared_memory and shm.available() else None
    handlers = {name: _rpc(name, fn, segments) for name, fn in service.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(K_SERVICE, handlers),))


class ComputeServer:
    """A started offload server: its port, its service, and ``stop``."""

    def __init__(self, server: grpc.aio.Server, service: HeService, port: int) -> None:
        self.server = server
        self.service = service
        self.port = port

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving, then close the backend."""
        await self.server.stop(grace)
        await self.service.aclose()


async def serve_compute(
    config: ComputeConfig, *, listen: str | None = None, backend: HeBackend | None = None
) -> ComputeServer:
    """Start the offload service on ``listen`` (default ``config.listen``; port 0 picks a free one)."""
    from fedgate.config import parse_hostport

    address = listen or config.listen
    host, port = parse_hostport(address, path="compute.listen")
    be = backend if backend is not None else await asyncio.to_thread(create_backend, config)
    service = HeService(config, be)
    # no SO_REUSEPORT: a second gateway on the same port must fail, not share the traffic
    server = grpc.aio.server(options=[*server_options(config), ("grpc.so_reuseport", 0)])
    add_to_server(server, service)
    try:
        bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except RuntimeError:  # newer grpcio raises instead of returning 0
        bound = 0
    if bound == 0:
        await asyncio.to_thread(be.close)
        raise ConfigError(f"cannot listen on {address}", path="compute.listen")
    await server.start()
    log.info("HE offload service ready", extra={"fields": {"listen": f"{host}:{bound}", "backend": be.name}})
    return ComputeServer(server, service, bound)
