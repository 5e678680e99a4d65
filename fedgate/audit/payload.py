"""From an Envelope to inspector events: FATE's framings, split objects and chunk reassembly.

FATE object bytes are ``mode byte | rest`` (FATE wire facts, section 6): mode 0 is an inline pickle,
mode 1 a split header ``!QIIIIII`` (total size, slice count, slice size, then the slice table's
meta) whose slices travelled before it as a table on ``{name}__table_persistent_split__``. A table
message (OSX ``content_type: application/json``) is a JSON list of ``{"k": hex, "v": hex}`` whose
keys and values are pickles; for the split table each key is the slice index and each value the
slice's bytes. Rollsite objects travel in chunks: every ``Packet.body.value`` is an EggRoll bin batch
(``magic | version | 0 | 0`` then ``i32 BE len | key | i32 BE len | value`` pairs) whose keys are the
chunk index (4 bytes BE) and whose values are 100,000-byte pieces of the object bytes.

Rules of this module:

1. Pure and sans-IO: :meth:`PayloadInspector.inspect` takes an envelope and ``now`` and returns an
   :class:`Inspection`; nothing here blocks, sleeps or reads a clock.
2. A split or chunked object is walked *as it streams*: each piece is fed to one
   :class:`~fedgate.audit.pickle_scan.PickleWalker` in index order; out-of-order pieces wait in a
   bounded buffer (``max_pending_bytes`` over all objects). Objects idle for ``idle_timeout_s`` or
   beyond ``max_objects`` are dropped oldest first with a :class:`ScanLimit` event.
3. Small inner pickles (a table key, a slice's bytes wrapper) are read with ``pickletools.genops``
   and accepted only in the exact shapes FATE writes; never unpickled.
"""

from __future__ import annotations

import json
import pickletools
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from google.protobuf.message import DecodeError

from fedgate.audit.events import Event, Malformed, ScanLimit
from fedgate.audit.pickle_scan import PickleLimits, PickleWalker
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.protos import osx_pb2, proxy_pb2, transfer_pb2

__all__ = ["Inspection", "PayloadInspector", "PayloadLimits", "object_name"]

K_SPLIT_HEADER = struct.Struct("!QIIIIII")
K_BIN_MAGIC = bytes.fromhex("46709394")  # EggRoll PairBinWriter magic
K_BIN_HEAD = 16  # bytes: magic, version, two int32 zeros
K_MAX_WRAPPER = 64 * 1024 * 1024  # bytes: largest pickled slice accepted from a table value

_TABLE_NAME = re.compile(r"^(?P<base>.*?)__table_persistent_(?P<kind>split|\d+)__$")

_SMALL_VALUE_OPS = frozenset({"BININT", "BININT1", "BININT2", "LONG1", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"})

Form = Literal["inline", "split_header", "split_slice", "table", "chunk", "opaque"]


def object_name(raw: str) -> str:
    """FATE's object name without the table suffixes (``x__table_persistent_split__`` -> ``x``)."""
    match = _TABLE_NAME.match(raw)
    return match.group("base") if match else raw


@dataclass(frozen=True, slots=True)
class PayloadLimits:
    """Bounds of the stateful part (reassembly across messages)."""

    max_pending_bytes: int = 256 * 1024 * 1024
    """Out-of-order slice/chunk bytes buffered over all objects."""
    max_objects: int = 1024
    """Objects being reassembled at once."""
    idle_timeout_s: float = 600.0
    """Seconds after which an unfinished object is dropped."""
    pickle: PickleLimits = PickleLimits()


@dataclass(frozen=True, slots=True)
class Inspection:
    """What one message turned out to be and what was found in it."""

    protocol: str
    name: str
    """FATE object name (table suffixes removed); empty when unknown."""
    tag: str
    form: Form
    object_key: tuple[str, ...]
    """Identifies the FATE object this message belongs to (for remembering a rejected object)."""
    object_size: int | None
    """Total pickled size when the message says it (inline objects, split headers)."""
    events: tuple[Event, ...]


@dataclass(slots=True)
class _Assembly:
    walker: PickleWalker
    next_index: int = 0
    pending: dict[int, bytes] = field(default_factory=dict)
    fed: int = 0
    expected: int | None = None
    last_seen: float = 0.0
    mode_seen: bool = True
    """False for rollsite objects: their first byte is FATE's mode byte, not pickle."""
    inline: bool = True


class PayloadInspector:
    """Stateful (bounded) inspector of a stream of envelopes; one per direction is fine."""

    def __init__(self, *, limits: PayloadLimits = PayloadLimits()) -> None:
        self._limits = limits
        self._assemblies: OrderedDict[tuple[str, ...], _Assembly] = OrderedDict()
        self._pending_bytes = 0

    @property
    def open_objects(self) -> int:
        return len(self._assemblies)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def inspect(self, envelope: Envelope, *, now: float) -> Inspection:
        events: list[Event] = self._expire(now=now)
        if envelope.protocol == "rollsite":
            return self._rollsite(envelope, events, now=now)
        return self._osx(envelope, events, now=now)

    # -- OSX queue mode -----------------------------------------------------------------------------

    def _osx(self, env: Envelope, events: list[Event], *, now: float) -> Inspection:
        base = ("osx", env.session_id, env.src_party, env.dst_party)
        try:
            msg = osx_pb2.Message.FromString(env.payload)
            head = json.loads(msg.head) if msg.head else {}
            if not isinstance(head, dict):
                raise ValueError("head is not a JSON object")
        except (DecodeError, ValueError) as exc:
            events.append(Malformed("osx", f"not an org.ppc.ptp.Message with a JSON head: {exc}"))
            return Inspection("osx", "", "", "opaque", base, None, tuple(events))
        raw_name = str(head.get("message_id", ""))
        tag = str(head.get("correlation_id", ""))
        name = object_name(raw_name)
        key = (*base, name, tag)
        body = msg.body
        if head.get("content_type") == "application/json":
            split = raw_name.endswith("__table_persistent_split__")
            events.extend(self._table(body, key if split else None, now=now))
            return Inspection("osx", name, tag, "split_slice" if split else "table", key, None, tuple(events))
        form, size = self._fate_object(body, key, events, now=now)
        return Inspection("osx", name, tag, form, key, size, tuple(events))

    def _fate_object(
        self, body: bytes, key: tuple[str, ...], events: list[Event], *, now: float
    ) -> tuple[Form, int | None]:
        if not body:
            events.append(Malformed("fate", "empty object bytes"))
            return "opaque", None
        if body[0] == 0:
            walker = PickleWalker(limits=self._limits.pickle)
            walker.feed(memoryview(body)[1:])
            walker.close()
            events.extend(walker.events())
            return "inline", len(body) - 1
        if body[0] == 1 and len(body) == 1 + K_SPLIT_HEADER.size:
            total, *_ = K_SPLIT_HEADER.unpack_from(body, 1)
            self._expect(key, total, events, now=now)
            return "split_header", total
        events.append(Malformed("fate", f"unknown object mode byte {body[0]} ({len(body)} bytes)"))
        return "opaque", None

    def _table(self, body: bytes, split_key: tuple[str, ...] | None, *, now: float) -> list[Event]:
        events: list[Event] = []
        try:
            rows = json.loads(body)
            if not isinstance(rows, list):
                raise ValueError("not a JSON list")
            pairs = [(bytes.fromhex(r["k"]), bytes.fromhex(r["v"])) for r in rows]
        except (ValueError, TypeError, KeyError) as exc:
            events.append(Malformed("table", f"not a JSON list of hex k/v pairs: {exc}"))
            return events
        for k, v in pairs:
            if split_key is None:
                events.extend(self._walk_whole(k))
                events.extend(self._walk_whole(v))
                continue
            index, piece = _small_pickle(k), _small_pickle(v)
            if not isinstance(index, int) or not isinstance(piece, bytes):
                events.append(Malformed("table", "split slice key/value is not a pickled (int, bytes) pair"))
                continue
            events.extend(self._piece(split_key, index, piece, now=now))
        return events

    def _walk_whole(self, data: bytes) -> list[Event]:
        walker = PickleWalker(limits=self._limits.pickle)
        walker.feed(data)
        walker.close()
        return walker.events()

    # -- rollsite stream mode ---------------------------------------------------------------------

    def _rollsite(self, env: Envelope, events: list[Event], *, now: float) -> Inspection:
        base = ("rollsite", env.session_id, env.src_party, env.dst_party)
        try:
            packet = proxy_pb2.Packet.FromString(env.payload)
            rs = transfer_pb2.RollSiteHeader.FromString(packet.header.ext)
        except DecodeError as exc:
            events.append(Malformed("rollsite", f"not a Packet with a RollSiteHeader: {exc}"))
            return Inspection("rollsite", "", "", "opaque", base, None, tuple(events))
        key = ("rollsite", rs.rollSiteSessionId, rs.srcPartyId, rs.dstPartyId, rs.name, rs.tag)
        value = packet.body.value
        if not value:
            return Inspection("rollsite", rs.name, rs.tag, "opaque", key, None, tuple(events))
        pairs = _bin_batch(value)
        if pairs is None:
            events.append(Malformed("rollsite", "body is not an EggRoll bin batch"))
            return Inspection("rollsite", rs.name, rs.tag, "opaque", key, None, tuple(events))
        if rs.dataType == "rollpair":
            for k, v in pairs:
                events.extend(self._walk_whole(k))
                events.extend(self._walk_whole(v))
            return Inspection("rollsite", rs.name, rs.tag, "table", key, None, tuple(events))
        for k, v in pairs:
            events.extend(self._piece(key, int.from_bytes(k, "big"), v, now=now, fate_mode=True))
        if rs.stage == "finish_partition":
            assembly = self._assemblies.get(key)
            if assembly is not None:
                self._expect(key, assembly.fed + sum(len(p) for p in assembly.pending.values()), events, now=now)
        return Inspection("rollsite", rs.name, rs.tag, "chunk", key, None, tuple(events))

    # -- reassembly -------------------------------------------------------------------------------

    def _assembly(self, key: tuple[str, ...], *, now: float, fate_mode: bool) -> _Assembly:
        assembly = self._assemblies.get(key)
        if assembly is None:
            assembly = _Assembly(PickleWalker(limits=self._limits.pickle), mode_seen=not fate_mode)
            self._assemblies[key] = assembly
        self._assemblies.move_to_end(key)
        assembly.last_seen = now
        return assembly

    def _piece(
        self, key: tuple[str, ...], index: int, data: bytes, *, now: float, fate_mode: bool = False
    ) -> list[Event]:
        events: list[Event] = []
        assembly = self._assembly(key, now=now, fate_mode=fate_mode)
        if index < assembly.next_index or index in assembly.pending:
            events.append(Malformed("fate", f"piece {index} of {key[-2]!r} arrived twice"))
            return events
        if index > assembly.next_index:
            if self._pending_bytes + len(data) > self._limits.max_pending_bytes:
                events.append(ScanLimit("reassembly.bytes", f"out-of-order pieces over {self._pending_bytes}"))
                self._drop(key)
                return events
            assembly.pending[index] = data
            self._pending_bytes += len(data)
            return events
        self._feed(assembly, data)
        while assembly.next_index in assembly.pending:
            piece = assembly.pending.pop(assembly.next_index)
            self._pending_bytes -= len(piece)
            self._feed(assembly, piece)
        events.extend(assembly.walker.events())
        events.extend(self._maybe_finish(key, assembly))
        while len(self._assemblies) > self._limits.max_objects:
            old, _ = next(iter(self._assemblies.items()))
            events.append(ScanLimit("reassembly.objects", f"more than {self._limits.max_objects} open objects"))
            self._drop(old)
        return events

    def _feed(self, assembly: _Assembly, data: bytes) -> None:
        assembly.next_index += 1
        view = memoryview(data)
        if not assembly.mode_seen and view:
            assembly.mode_seen = True
            assembly.inline = view[0] == 0
            assembly.fed += 1
            view = view[1:]
        assembly.fed += len(view)
        if assembly.inline:
            assembly.walker.feed(view)

    def _expect(self, key: tuple[str, ...], total: int, events: list[Event], *, now: float) -> None:
        assembly = self._assembly(key, now=now, fate_mode=False)
        assembly.expected = total
        events.extend(self._maybe_finish(key, assembly))

    def _maybe_finish(self, key: tuple[str, ...], assembly: _Assembly) -> list[Event]:
        if assembly.expected is None or assembly.fed < assembly.expected:
            return []
        events: list[Event] = []
        if assembly.fed > assembly.expected:
            events.append(Malformed("fate", f"object is {assembly.fed} bytes, header said {assembly.expected}"))
        if assembly.inline:
            assembly.walker.close()
        events.extend(assembly.walker.events())
        self._drop(key)
        return events

    def _drop(self, key: tuple[str, ...]) -> None:
        assembly = self._assemblies.pop(key, None)
        if assembly is not None:
            self._pending_bytes -= sum(len(p) for p in assembly.pending.values())

    def _expire(self, *, now: float) -> list[Event]:
        events: list[Event] = []
        while self._assemblies:
            key, assembly = next(iter(self._assemblies.items()))
            if now - assembly.last_seen <= self._limits.idle_timeout_s:
                break
            events.append(ScanLimit("reassembly.idle", f"object {key[-2]!r} unfinished after idle timeout"))
            self._drop(key)
        return events


def _small_pickle(data: bytes) -> int | bytes | None:
    """The value of a tiny pickle that holds exactly one int or one bytes object, else None."""
    value: int | bytes | None = None
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("PROTO", "FRAME", "MEMOIZE", "BINPUT", "STOP"):
                continue
            if value is not None or name not in _SMALL_VALUE_OPS or not isinstance(arg, int | bytes):
                return None
            value = arg
    except (ValueError, EOFError):
        return None
    return value


def _bin_batch(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """Pairs of an EggRoll bin batch, or None when the bytes are not one."""
    if len(data) < K_BIN_HEAD or data[:4] != K_BIN_MAGIC:
        return None
    pairs: list[tuple[bytes, bytes]] = []
    pos = K_BIN_HEAD
    while pos + 4 <= len(data):
        klen = int.from_bytes(data[pos : pos + 4], "big", signed=True)
        if klen <= 0:
            break
        kend = pos + 4 + klen
        if kend + 4 > len(data):
            return None
        vlen = int.from_bytes(data[kend : kend + 4], "big", signed=True)
        vend = kend + 4 + vlen
        if vlen < 0 or vend > len(data):
            return None
        pairs.append((data[pos + 4 : kend], data[kend + 4 : vend]))
        pos = vend
    return pairs
