"""Shared-memory payloads for same-host clients of the HE offload service (Linux, ``/dev/shm``).

Why: a batch of 10,000 ciphertexts is megabytes (7.7 MB for one 1024-bit ``Add``: two operands in, one
result out). Through gRPC those bytes are copied about a dozen times (msgpack, gRPC slices, the
loopback socket both ways, msgpack again), which cost 15-35 ms per call here: +25..50 % over the
arithmetic itself for ``Add``. A worker on the gateway's host can instead hand the operands over in
a shared-memory file: the gRPC message then carries only the file's name and offsets, and each payload
is copied twice (in, and back out) instead.

Protocol (an extension of the msgpack maps in :mod:`fedgate.compute.service`):

    request   {..., "shm": NAME, "shm_key": TOKEN, "shm_in": {FIELD: [offset, length], ...},
               "shm_out": [offset, capacity]}
    reply     {..., "shm_reply": [FIELD, length]}     (the result sits at the request's out offset)

``NAME`` is ``fedgate-he-`` and 32 hex digits, a file in ``/dev/shm`` that the client created (mode
0600, so only its user, or root, can open it) and keeps for its own lifetime; the gateway opens it
without creating, following links or growing it, checks every offset against its size, and keeps a
few mappings between calls (:class:`SegmentCache`), dropping one as soon as its file is gone. A
gateway with ``compute.shared_memory = false``, or that cannot open the file (another host, another
user, another container), answers INVALID_ARGUMENT with "shared memory" in the message, and the
client falls back to inline bytes for the rest of its life.

Capability: a segment's name shows in any listing of ``/dev/shm``, so the name alone must not let
another local user make the gateway (which can open the file) read or write it for them. The client
writes a random 16-byte token at offset 0 of the file (readable only through the 0600 file) and quotes
it in every request (``shm_key``); the gateway compares it before touching anything else, and payload
offsets start after the 64-byte header.

Rules: the client owns and unlinks its files (``close``, or at interpreter exit through a finalizer);
the service never creates or unlinks one.
"""

from __future__ import annotations

import contextlib
import hmac
import mmap
import os
import re
import secrets
import sys
import weakref
from collections.abc import Iterator
from typing import Any

from fedgate.errors import InvalidRequestError

__all__ = ["K_SHM_DIR", "K_SHM_MIN_BYTES", "Arena", "ArenaPool", "SegmentCache", "available", "unpack_request"]

K_SHM_DIR = "/dev/shm"
K_SHM_MIN_BYTES = 256 << 10  # smaller calls travel inline (a few copies of a small payload cost nothing)
K_TOKEN_BYTES = 16  # the segment's capability: a random token at offset 0 that every request must quote
K_HEADER = 64  # payloads start here
K_NAME = re.compile(r"fedgate-he-[0-9a-f]{32}")
K_DISABLED = "shared memory transport"  # the marker the client looks for in a refusal


def available() -> bool:
    """Whether this host can use the transport at all (Linux with a writable /dev/shm)."""
    return sys.platform.startswith("linux") and os.path.isdir(K_SHM_DIR) and os.access(K_SHM_DIR, os.W_OK)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Arena:
    """One client-owned shared-memory file, mapped for the client's life (pages stay warm)."""

    def __init__(self, size: int) -> None:
        self.name = f"fedgate-he-{secrets.token_hex(16)}"
        self.path = os.path.join(K_SHM_DIR, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            _unlink(self.path)
            raise
        os.close(fd)
        self.size = size
        self.token = secrets.token_bytes(K_TOKEN_BYTES)
        self.map[:K_TOKEN_BYTES] = self.token
        self._finalizer = weakref.finalize(self, _unlink, self.path)

    def close(self) -> None:
        """Unmap and unlink the file."""
        self._finalizer()
        with contextlib.suppress(BufferError):
            self.map.close()


class ArenaPool:
    """Arenas for concurrent calls: take one big enough, give it back after the call."""

    def __init__(self) -> None:
        self._idle: list[Arena] = []

    def take(self, payload: int) -> Arena:
        """An arena with room for the header and ``payload`` bytes (inputs and the result)."""
        size = K_HEADER + payload
        for i, arena in enumerate(self._idle):
            if arena.size >= size:
                return self._idle.pop(i)
        if self._idle:  # too small: replace the smallest idle one
            self._idle.pop(0).close()
        return Arena(max(size, 1 << 20))

    def give_back(self, arena: Arena) -> None:
        self._idle.append(arena)
        self._idle.sort(key=lambda a: a.size)

    def close(self) -> None:
        for arena in self._idle:
            arena.close()
        self._idle.clear()


def pack_request(arena: Arena, request: dict[str, Any], fields: list[str], out_size: int) -> dict[str, Any]:
    """Move ``fields`` (bytes) of ``request`` into ``arena``; the result goes after them."""
    if K_HEADER + sum(len(request[name]) for name in fields) + out_size > arena.size:
        raise ValueError("the payloads do not fit the arena")
    out = dict(request)
    offsets: dict[str, list[int]] = {}
    pos = K_HEADER
    for name in fields:
        data: bytes = request[name]
        arena.map[pos : pos + len(data)] = data
        offsets[name] = [pos, len(data)]
        del out[name]
        pos += len(data)
    out.update(shm=arena.name, shm_key=arena.token, shm_in=offsets, shm_out=[pos, out_size])
    return out


def read_reply(arena: Arena, request: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    """Put the result the service wrote into ``arena`` back into ``reply`` as bytes."""
    spec = reply.pop("shm_reply", None)
    if spec is None:
        return reply
    name, length = spec
    offset, capacity = request["shm_out"]
    if not isinstance(name, str) or not isinstance(length, int) or not 0 <= length <= capacity:
        raise InvalidRequestError("malformed shared-memory reply")
    reply[name] = arena.map[offset : offset + length]
    return reply


def _span(value: Any, size: int, what: str) -> tuple[int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise InvalidRequestError(f"{what} must be [offset, length]")
    offset, length = value
    if offset < K_HEADER or length < 0 or offset + length > size:
        raise InvalidRequestError(f"{what} lies outside the shared memory segment")
    return offset, length


def _map(name: Any) -> tuple[tuple[int, int, int], mmap.mmap]:
    if not isinstance(name, str) or not K_NAME.fullmatch(name):
        raise InvalidRequestError(f"{K_DISABLED}: bad segment name")
    try:
        fd = os.open(os.path.join(K_SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        raise InvalidRequestError(f"{K_DISABLED}: cannot open the segment ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if st.st_size <= 0:
            raise InvalidRequestError(f"{K_DISABLED}: empty segment")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return (st.st_dev, st.st_ino, st.st_size), mmap.mmap(fd, st.st_size, flags=flags)
    finally:
        os.close(fd)


def _identity(name: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(os.path.join(K_SHM_DIR, name), follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size


class SegmentCache:
    """The service's mappings of client segments, kept between calls (mapping 8 MB costs about 1.3 ms).

    At most ``limit`` idle mappings are kept; one whose file was removed or replaced (a client that
    closed, or grew its arena) is dropped at the next lookup, so a client's memory is not pinned for
    long after it let go of it. Event-loop thread only.
    """

    def __init__(self, limit: int = 4) -> None:
        self._limit = limit
        self._maps: dict[str, tuple[tuple[int, int, int], mmap.mmap]] = {}
        self._busy: dict[str, int] = {}

    @contextlib.contextmanager
    def segment(self, name: Any) -> Iterator[mmap.mmap]:
        """The mapping of the client's segment ``name`` for one call."""
        self._sweep()
        entry = self._maps.pop(name, None) if isinstance(name, str) else None
        if entry is None:
            entry = _map(name)
        self._maps[name] = entry  # most recently used last
        self._busy[name] = self._busy.get(name, 0) + 1
        try:
            yield entry[1]
        finally:
            self._busy[name] -= 1
            if not self._busy[name]:
                del self._busy[name]
            self._trim()

    def _sweep(self) -> None:
        for name, (ident, segment) in list(self._maps.items()):
            if name not in self._busy and _identity(name) != ident:
                del self._maps[name]
                segment.close()

    def _trim(self) -> None:
        idle = [name for name in self._maps if name not in self._busy]
        for name in idle[: max(0, len(idle) - self._limit)]:
            self._maps.pop(name)[1].close()

    def close(self) -> None:
        """Unmap everything idle (the service is stopping)."""
        self._limit = 0
        self._trim()

    def __len__(self) -> int:
        return len(self._maps)


def unpack_request(segment: mmap.mmap, request: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int]]:
    """The request with its shared-memory fields read in as bytes, and the (offset, capacity) for the reply."""
    size = len(segment)
    key = request.get("shm_key")
    if not isinstance(key, bytes) or not hmac.compare_digest(key, segment[:K_TOKEN_BYTES]):
        raise InvalidRequestError("shared memory segment: wrong or missing token")
    spans = request.get("shm_in")
    if not isinstance(spans, dict):
        raise InvalidRequestError("field 'shm_in' must be a map")
    out = {k: v for k, v in request.items() if k not in ("shm", "shm_key", "shm_in", "shm_out")}
    for name, span in spans.items():
        if not isinstance(name, str) or name in out:
            raise InvalidRequestError("bad field in 'shm_in'")
        offset, length = _span(span, size, f"shm_in[{name!r}]")
        out[name] = segment[offset : offset + length]
    return out, _span(request.get("shm_out"), size, "shm_out")


def write_reply(segment: mmap.mmap, where: tuple[int, int], reply: dict[str, Any]) -> dict[str, Any]:
    """Move the reply's one bytes payload into the segment (small replies stay inline)."""
    payloads = [k for k, v in reply.items() if isinstance(v, bytes) and len(v) >= 1024]
    if len(payloads) != 1:
        return reply
    name = payloads[0]
    data: bytes = reply[name]
    offset, capacity = where
    if len(data) > capacity:
        raise InvalidRequestError(f"result of {len(data)} bytes does not fit the {capacity} bytes reserved for it")
    segment[offset : offset + len(data)] = data
    out = {k: v for k, v in reply.items() if k != name}
    out["shm_reply"] = [name, len(data)]
    return out
