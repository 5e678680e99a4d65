"""The byte bridge between the gateway and a QUIC worker process: one Unix stream per channel.

Rules of this module (an asyncio adapter shared by :mod:`~fedgate.congestion.quic_workers` and
:mod:`~fedgate.congestion.quic_worker`):

1. A bridge connection starts with one JSON line each way (a request, then its answer), at most
   ``K_MAX_LINE`` bytes. After that it carries one channel's bytes.
2. Gateway -> worker: the channel's bytes as they are; EOF = the gateway closed the channel.
3. ``aclose`` half-closes, as a QUIC stream's FIN does: what the peer still sends can be received
   until it ends (or ``K_LINGER`` passes, when the Unix stream is closed whatever happens).
4. Worker -> gateway: frames of a 1-byte kind and a 4-byte big-endian length: ``D`` data, ``E`` the
   peer ended its stream cleanly, ``X`` the QUIC side failed (UTF-8 reason), ``S`` the connection's
   congestion-controller snapshot as JSON (at the start, then every ``K_STATS_EVERY`` seconds; the
   gateway keeps the last one for its metrics). A Unix stream that ends without ``E`` or ``X`` means
   the worker died: the channel fails, saying so.
5. Everything read here came from another process: lengths and JSON are checked, never trusted. A
   malformed snapshot is dropped (logged once per channel); it never fails the channel's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import struct
from typing import Any

from fedgate.congestion._base import CongestionStatistics
from fedgate.errors import LocalError, PeerUnavailableError

__all__ = ["BridgeChannel", "parse_statistics", "read_line", "statistics_frame", "write_line"]

log = logging.getLogger("fedgate.congestion.quic_workers")

K_MAX_LINE = 64 * 1024  # bytes of one JSON line
K_FRAME_DATA = 1024 * 1024  # bytes of data a worker puts in one frame at most
K_MAX_FRAME = 4 * K_FRAME_DATA  # bytes of one worker -> gateway frame the gateway accepts
K_READ = 256 * 1024  # bytes per read of the gateway -> worker stream
K_LINGER = 60.0  # seconds a half-closed channel waits for the peer's end before it is closed anyway
K_STATS_EVERY = 1.0  # seconds between a worker's controller snapshots of one channel
K_HEADER = struct.Struct(">cI")
KIND_DATA, KIND_END, KIND_ERROR, KIND_STATS = b"D", b"E", b"X", b"S"
_STATS_TYPES = {"str": (str,), "int": (int,), "float | None": (int, float, type(None))}


async def read_line(reader: asyncio.StreamReader, *, what: str) -> dict[str, Any]:
    """One JSON object line (rule 1); LocalError naming ``what`` if it is missing or malformed."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as exc:
        raise LocalError(f"{what}: line over {K_MAX_LINE} bytes") from exc
    except asyncio.IncompleteReadError as exc:
        raise LocalError(f"{what}: the other side closed before its line") from exc
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise LocalError(f"{what}: not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise LocalError(f"{what}: expected a JSON object")
    return value


def write_line(writer: asyncio.StreamWriter, value: dict[str, Any]) -> None:
    writer.write(json.dumps(value, separators=(",", ":")).encode() + b"\n")


def frame(kind: bytes, data: bytes = b"") -> bytes:
    return K_HEADER.pack(kind, len(data)) + data


def statistics_frame(stats: CongestionStatistics) -> bytes:
    return frame(KIND_STATS, json.dumps(dataclasses.asdict(stats), separators=(",", ":")).encode())


def parse_statistics(data: bytes) -> CongestionStatistics | None:
    """A snapshot from an ``S`` frame, or None if it is not one field for field (rule 5)."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    fields = dataclasses.fields(CongestionStatistics)
    if not isinstance(value, dict) or set(value) != {f.name for f in fields}:
        return None
    for f in fields:
        item = value[f.name]
        if not isinstance(item, _STATS_TYPES.get(str(f.type), ())) or isinstance(item, bool):
            return None
    return CongestionStatistics(**value)


class BridgeChannel:
    """The gateway's end of a bridged QUIC channel (a :class:`fedgate.proxy.carrier.ByteChannel`)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer_party: str | None,
        description: str, worker: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._peer_party = peer_party
        self._description = description
        self._worker = worker
        self._eof = False
        self._error: PeerUnavailableError | None = None
        self._closed = False
        self._linger: asyncio.TimerHandle | None = None
        self._stats: CongestionStatistics | None = None
        self._bad_stats_logged = False

    @property
    def peer_party(self) -> str | None:
        return self._peer_party

    @property
    def description(self) -> str:
        return self._description

    def statistics(self) -> CongestionStatistics | None:
        """The worker's last snapshot of this channel's QUIC connection (rule 4), if one came."""
        return self._stats

    async def send(self, data: bytes | memoryview) -> None:
        if self._closed:
            raise LocalError(f"{self._description}: send after aclose")
        if self._error is not None:
            raise PeerUnavailableError(str(self._error))
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise PeerUnavailableError(f"{self._description}: {self._worker} is gone: {exc}") from exc

    async def receive(self) -> bytes:
        try:
            while True:
                data = await self._receive_frame()
                if data is None:
                    continue  # an empty data frame
                return data
        finally:
            if self._closed and (self._eof or self._error is not None):
                self._close_now()

    async def _receive_frame(self) -> bytes | None:
        if self._eof:
            return b""
        if self._error is not None:
            raise PeerUnavailableError(str(self._error))
        try:
            kind, size = K_HEADER.unpack(await self._reader.readexactly(K_HEADER.size))
            if size > K_MAX_FRAME:
                raise LocalError(f"{self._worker} sent a frame of {size} bytes")
            data = await self._reader.readexactly(size) if size else b""
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._error = PeerUnavailableError(f"{self._description}: {self._worker} exited")
            raise self._error from exc
        except LocalError as exc:
            self._error = PeerUnavailableError(f"{self._description}: {exc}")
            raise self._error from exc
        if kind == KIND_DATA:
            return data or None
        if kind == KIND_STATS:
            stats = parse_statistics(data)
            if stats is not None:
                self._stats = stats
            elif not self._bad_stats_logged:
                self._bad_stats_logged = True
                log.warning("%s: %s sent a malformed controller snapshot; ignored", self._description, self._worker)
            return None
        if kind == KIND_END:
            self._eof = True
            return b""
        if kind == KIND_ERROR:
            self._error = PeerUnavailableError(data.decode("utf-8", "replace") or f"{self._description}: failed")
            raise self._error
        self._error = PeerUnavailableError(f"{self._description}: {self._worker} sent a bad frame {kind!r}")
        raise self._error

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._eof or self._error is not None:
            self._close_now()
            return
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self._writer.write_eof()
        self._linger = asyncio.get_running_loop().call_later(K_LINGER, self._close_now)

    def _close_now(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._writer.close()
