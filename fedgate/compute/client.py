"""A Python client for the HE offload service (asyncio, grpc.aio).

    async with HeClient("127.0.0.1:9390") as he:
        pk = await he.generate_key(2048)
        cts = await he.encrypt(pk, to_limbs(values, pk.plain_width))
        sums = await he.add(pk, cts, cts)
        plain = await he.decrypt(pk, sums)          # the gateway holds the secret key

Decryption (and dropping a secret key) needs the key's token, which the gateway hands to the client
that generated or imported the key; this client keeps it and sends it. Another process that should
decrypt with the same key gets it from this one: ``he.secret_token(pk)``, then
``other.set_secret_token(pk, token)`` (a capability: hand it over only as you would the secret key).

Same-host clients (a loopback or ``unix:`` target on Linux) hand batches of 256 KiB and more to the
gateway in shared memory (:mod:`fedgate.compute.shm`); ``shared_memory=False`` turns that off, and a
gateway that refuses it is answered with inline bytes from then on. ``transport`` says which is in use.

Rules: server errors become :class:`~fedgate.errors.FedgateError` subclasses by gRPC status
(INVALID_ARGUMENT -> InvalidRequestError, NOT_FOUND -> UnknownKeyError, UNAVAILABLE ->
PeerUnavailableError, PERMISSION_DENIED -> KeyTokenError, anything else -> LocalError), raised ``from``
the grpc error.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import msgpack

from fedgate.compute import shm
from fedgate.compute.config import ComputeConfig
from fedgate.compute.keystore import KeyTokenError, NoSecretKeyError, UnknownKeyError
from fedgate.compute.limbs import LimbBuffer
from fedgate.compute.paillier import PublicKey
from fedgate.compute.service import K_SERVICE, server_options
from fedgate.errors import FedgateError, InvalidRequestError, LocalError, PeerUnavailableError, StoreFullError

__all__ = ["HeClient"]

K_ERRORS: dict[grpc.StatusCode, type[FedgateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: UnknownKeyError,
    grpc.StatusCode.FAILED_PRECONDITION: NoSecretKeyError,
    grpc.StatusCode.UNAVAILABLE: PeerUnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: StoreFullError,
    grpc.StatusCode.PERMISSION_DENIED: KeyTokenError,
}


class HeClient:
    """Client of ``fedgate.compute.HeOffload``."""

    def __init__(
        self,
        target: str,
        *,
        config: ComputeConfig | None = None,
        timeout_s: float = 600.0,
        shared_memory: bool | None = None,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=server_options(config or ComputeConfig()))
        self._timeout = timeout_s
        use_shm = _same_host(target) if shared_memory is None else shared_memory
        self._arenas: shm.ArenaPool | None = shm.ArenaPool() if use_shm and shm.available() else None
        self._tokens: dict[str, bytes] = {}  # key id -> the token of a secret key this client holds

    @property
    def transport(self) -> str:
        """``shared memory`` or ``inline`` (how large batches reach the gateway now)."""
        return "shared memory" if self._arenas is not None else "inline"

    async def __aenter__(self) -> HeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel and remove this client's shared-memory files."""
        await self._channel.close(None)
        if self._arenas is not None:
            self._arenas.close()

    async def _batch(self, method: str, request: dict[str, Any], fields: list[str], out_size: int) -> dict[str, Any]:
        """A call whose ``fields`` are large: through shared memory where possible, else inline."""
        arenas = self._arenas
        size = sum(len(request[name]) for name in fields)
        if arenas is None or size + out_size < shm.K_SHM_MIN_BYTES:
            return await self.call(method, request)
        arena = arenas.take(size + out_size)
        try:
            shared = shm.pack_request(arena, request, fields, out_size)
            try:
                return shm.read_reply(arena, shared, await self.call(method, shared))
            except InvalidRequestError as exc:
                if shm.K_DISABLED not in str(exc):
                    raise
                self._arenas = None  # the gateway cannot or will not: inline from now on
        finally:
            if self._arenas is arenas:
                arenas.give_back(arena)
            else:
                arena.close()
                arenas.close()
        return await self.call(method, request)

    async def call(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        """One raw call (msgpack map in, map out)."""
        rpc = self._channel.unary_unary(f"/{K_SERVICE}/{method}", request_serializer=None, response_deserializer=None)
        try:
            raw = await rpc(msgpack.packb(request, use_bin_type=True), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            cls = K_ERRORS.get(exc.code(), LocalError)
            raise cls(f"{method}: {exc.details()}") from exc
        reply = msgpack.unpackb(raw, raw=False)
        if not isinstance(reply, dict):
            raise LocalError(f"{method}: malformed reply")
        return reply

    async def generate_key(self, bits: int | None = None) -> PublicKey:
        """A key pair generated in the gateway; the secret stays there."""
        reply = await self.call("GenerateKey", {} if bits is None else {"bits": bits})
        pk = PublicKey(int.from_bytes(reply["n"], "little"))
        self._tokens[pk.key_id] = bytes(reply["secret_token"])
        return pk

    async def register_public_key(self, pk: PublicKey) -> str:
        """Register someone's public key for encryption and evaluation."""
        reply = await self.call("RegisterPublicKey", {"n": pk.n.to_bytes(pk.plain_width * 4, "little")})
        return str(reply["key_id"])

    async def register_fate_public_key(self, state: bytes) -> PublicKey:
        """Register a fate_utils ``PK.__getstate__()``."""
        key_id = (await self.call("RegisterPublicKey", {"fate_pk": bytes(state)}))["key_id"]
        reply = await self.call("PublicKey", {"key_id": key_id})
        return PublicKey(int.from_bytes(reply["n"], "little"))

    async def import_fate_secret_key(self, state: bytes) -> str:
        """Move a fate_utils ``SK.__getstate__()`` into the gateway (it never comes back out)."""
        reply = await self.call("ImportSecretKey", {"fate_sk": bytes(state)})
        key_id = str(reply["key_id"])
        self._tokens[key_id] = bytes(reply["secret_token"])
        return key_id

    def secret_token(self, pk: PublicKey) -> bytes:
        """The token of a secret key this client generated or imported (to hand to another process)."""
        token = self._tokens.get(pk.key_id)
        if token is None:
            raise KeyTokenError(f"this client holds no secret_token for key {pk.key_id!r}")
        return token

    def set_secret_token(self, pk: PublicKey, token: bytes) -> None:
        """Use a secret key's token received from the client that holds it."""
        self._tokens[pk.key_id] = bytes(token)

    async def encrypt(self, pk: PublicKey, plaintexts: LimbBuffer, *, obfuscate: bool = True) -> LimbBuffer:
        """Batch encryption."""
        req = {"key_id": pk.key_id, "plaintexts": plaintexts.data, "obfuscate": obfuscate}
        out = plaintexts.count * pk.cipher_width * 4
        return LimbBuffer((await self._batch("Encrypt", req, ["plaintexts"], out))["ciphertexts"], pk.cipher_width)

    async def decrypt(self, pk: PublicKey, ciphertexts: LimbBuffer) -> LimbBuffer:
        """Batch decryption by the gateway (it must hold the secret key)."""
        req = {"key_id": pk.key_id, "secret_token": self._tokens.get(pk.key_id, b""), "ciphertexts": ciphertexts.data}
        out = ciphertexts.count * pk.plain_width * 4
        return LimbBuffer((await self._batch("Decrypt", req, ["ciphertexts"], out))["plaintexts"], pk.plain_width)

    async def add(self, pk: PublicKey, a: LimbBuffer, b: LimbBuffer) -> LimbBuffer:
        """Element-wise homomorphic addition."""
        req = {"key_id": pk.key_id, "a": a.data, "b": b.data}
        out = a.count * pk.cipher_width * 4
        return LimbBuffer((await self._batch("Add", req, ["a", "b"], out))["ciphertexts"], pk.cipher_width)

    async def mul_scalar(self, pk: PublicKey, ciphertexts: LimbBuffer, scalars: LimbBuffer) -> LimbBuffer:
        """Element-wise multiplication by plaintext residues."""
        req = {"key_id": pk.key_id, "ciphertexts": ciphertexts.data, "scalars": scalars.data}
        out = ciphertexts.count * pk.cipher_width * 4
        reply = await self._batch("MulScalar", req, ["ciphertexts", "scalars"], out)
        return LimbBuffer(reply["ciphertexts"], pk.cipher_width)

    async def drop_key(self, pk: PublicKey) -> bool:
        """Forget a key in the gateway (a secret key only with its token)."""
        req = {"key_id": pk.key_id, "secret_token": self._tokens.get(pk.key_id, b"")}
        dropped = bool((await self.call("DropKey", req))["dropped"])
        self._tokens.pop(pk.key_id, None)
        return dropped

    async def stats(self) -> dict[str, Any]:
        """Backend counters."""
        return await self.call("Stats", {})


def _same_host(target: str) -> bool:
    """Whether a gRPC target names this host (loopback address or a Unix-domain socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
    return host in ("localhost", "::1") or host.startswith("127.")
