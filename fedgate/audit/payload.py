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
   beyond ``max_objects`` are dropped oldest first and remembered: their later pieces, and a split
   header (or last rollsite chunk) whose object was not wholly inspected, get a :class:`ScanLimit`.
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
K_MAX_DROPPED = 65536  # keys of dropped objects remembered (their later pieces are rejected)

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
    """One object being reassembled: pieces are fed to ``walker`` in index order."""

    walker: PickleWalker
    chunked: bool
    """True for rollsite chunks: the stream starts with FATE's mode byte (then pickle or split header)."""
    next_index: int = 0
    pending: dict[int, bytes] = field(default_factory=dict)
    fed: int = 0
    """Pickle bytes fed so far (the mode byte and a split header are not pickle)."""
    last_seen: float = 0.0
    mode: int | None = None
    split_header: bytearray = field(default_factory=bytearray)


class PayloadInspector:
    """Stateful (bounded) inspector of a stream of envelopes; one per direction.

    Two kinds of reassembly share one bounded table: ``split`` (FATE's slice table, fed as pickle)
    and ``chunks`` (a rollsite object, fed as FATE object bytes). An object dropped for a bound (idle,
    too many objects, too many out-of-order bytes) is remembered (``K_MAX_DROPPED`` keys) so that its
    later pieces are rejected rather than passed uninspected; a split header whose object was not
    completely inspected is rejected too (FATE cannot rebuild the object without it).
    """

    def __init__(self, *, limits: PayloadLimits = PayloadLimits()) -> None:
        self._limits = limits
        self._assemblies: OrderedDict[tuple[str, ...], _Assembly] = OrderedDict()
        self._dropped: OrderedDict[tuple[str, ...], str] = OrderedDict()
        self._pending_bytes = 0

    @property
    def open_objects(self) -> int:
        return len(self._assemblies)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def inspect(self, envelope: Envelope, *, now: float) -> Inspection:
        self._expire(now=now)
        if envelope.protocol == "rollsite":
            return self._rollsite(envelope, now=now)
        return self._osx(envelope, now=now)

    # -- OSX queue mode -----------------------------------------------------------------------------

    def _osx(self, env: Envelope, *, now: float) -> Inspection:
        events: list[Event] = []
        base = ("osx", env.session_id, env.src_party, env.dst_party)
        fields = _osx_message(env.payload)
        if fields is None:
            try:
                msg = osx_pb2.Message.FromString(env.payload)
            except DecodeError as exc:
                events.append(Malformed("osx", f"not an org.ppc.ptp.Message: {exc}"))
                return Inspection("osx", "", "", "opaque", base, None, tuple(events))
            fields = (msg.head, memoryview(msg.body))
        raw_head, body = fields
        try:
            head = _json_head(raw_head) if raw_head else {}
            if not isinstance(head, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # UnicodeDecodeError included
            # FATE always writes a JSON head; the body is still inspected as an object
            events.append(Malformed("osx", f"Message.head is not a JSON object: {exc}"))
            head = {}
        raw_name = str(head.get("message_id", ""))
        tag = str(head.get("correlation_id", ""))
        name = object_name(raw_name)
        key = (*base, name, tag)
        if head.get("content_type") == "application/json":
            split = raw_name.endswith("__table_persistent_split__")
            self._table(_json_pairs(bytes(body), events), key if split else None, events, now=now)
            return Inspection("osx", name, tag, "split_slice" if split else "table", key, None, tuple(events))
        form, size = self._fate_object(body, key, events)
        return Inspection("osx", name, tag, form, key, size, tuple(events))

    def _fate_object(
        self, body: bytes | memoryview, key: tuple[str, ...], events: list[Event]
    ) -> tuple[Form, int | None]:
        if not body:
            events.append(Malformed("fate", "empty object bytes"))
            return "opaque", None
        if body[0] == 0:
            events.extend(self._walk_whole(body, skip=1))
            return "inline", len(body) - 1
        if body[0] == 1 and len(body) == 1 + K_SPLIT_HEADER.size:
            total = K_SPLIT_HEADER.unpack_from(body, 1)[0]
            self._split_header(key, total, events)
            return "split_header", total
        events.append(Malformed("fate", f"unknown object mode byte {body[0]} ({len(body)} bytes)"))
        return "opaque", None

    def _table(
        self, pairs: list[tuple[bytes, bytes]], split_key: tuple[str, ...] | None, events: list[Event], *, now: float
    ) -> None:
        """Rows of a table: each key and value is a pickle; split-table values are slices of one."""
        for k, v in pairs:
            if split_key is None:
                events.extend(self._walk_whole(k))
                events.extend(self._walk_whole(v))
                continue
            index, piece = _small_pickle(k), _small_pickle(v)
            if not isinstance(index, int) or not isinstance(piece, bytes):
                events.append(Malformed("table", "split slice key/value is not a pickled (int, bytes) pair"))
                continue
            self._piece(("split", *split_key), index, piece, events, now=now)

    def _walk_whole(self, data: bytes | memoryview, *, skip: int = 0) -> list[Event]:
        walker = PickleWalker(limits=self._limits.pickle)
        walker.feed(data, skip=skip)
        walker.close()
        return walker.events()

    # -- rollsite stream mode ---------------------------------------------------------------------

    def _rollsite(self, env: Envelope, *, now: float) -> Inspection:
        events: list[Event] = []
        base = ("rollsite", env.session_id, env.src_party, env.dst_party)
        try:
            packet = proxy_pb2.Packet.FromString(env.payload)
            rs = transfer_pb2.RollSiteHeader.FromString(packet.header.ext)
        except DecodeError as exc:
            events.append(Malformed("rollsite", f"not a Packet with a RollSiteHeader: {exc}"))
            return Inspection("rollsite", "", "", "opaque", base, None, tuple(events))
        name = object_name(rs.name)
        key = ("rollsite", rs.rollSiteSessionId, rs.srcPartyId, rs.dstPartyId, name, rs.tag)
        pairs = _bin_batch(packet.body.value) if packet.body.value else []
        if pairs is None:
            events.append(Malformed("rollsite", "body is not an EggRoll bin batch"))
            return Inspection("rollsite", name, rs.tag, "opaque", key, None, tuple(events))
        if rs.dataType == "rollpair":
            split = rs.name.endswith("__table_persistent_split__")
            self._table(pairs, key if split else None, events, now=now)
            return Inspection("rollsite", name, rs.tag, "split_slice" if split else "table", key, None, tuple(events))
        for k, v in pairs:
            self._piece(("chunks", *key), int.from_bytes(k, "big"), v, events, now=now)
        if rs.stage == "finish_partition":
            self._finish_chunks(key, events)
        return Inspection("rollsite", name, rs.tag, "chunk", key, None, tuple(events))

    # -- reassembly -------------------------------------------------------------------------------

    def _piece(self, akey: tuple[str, ...], index: int, data: bytes, events: list[Event], *, now: float) -> None:
        why = self._dropped.get(akey)
        if why is not None:
            events.append(ScanLimit("reassembly.dropped", f"object {akey[-2]!r} was dropped earlier: {why}"))
            return
        assembly = self._assemblies.get(akey)
        if assembly is None:
            assembly = _Assembly(PickleWalker(limits=self._limits.pickle), chunked=akey[0] == "chunks")
            self._assemblies[akey] = assembly
        self._assemblies.move_to_end(akey)
        assembly.last_seen = now
        if index < assembly.next_index or index in assembly.pending:
            events.append(Malformed("fate", f"piece {index} of {akey[-2]!r} arrived twice"))
            return
        if index > assembly.next_index:
            if self._pending_bytes + len(data) > self._limits.max_pending_bytes:
                reason = f"out-of-order pieces over {self._limits.max_pending_bytes} bytes"
                events.append(ScanLimit("reassembly.bytes", reason))
                self._drop(akey, reason)
                return
            assembly.pending[index] = data
            self._pending_bytes += len(data)
            return
        self._feed(assembly, data)
        while assembly.next_index in assembly.pending:
            piece = assembly.pending.pop(assembly.next_index)
            self._pending_bytes -= len(piece)
            self._feed(assembly, piece)
        events.extend(assembly.walker.events())
        while len(self._assemblies) > self._limits.max_objects:
            self._drop(next(iter(self._assemblies)), f"more than {self._limits.max_objects} open objects")

    @staticmethod
    def _feed(assembly: _Assembly, data: bytes) -> None:
        assembly.next_index += 1
        view = memoryview(data)
        if assembly.chunked and assembly.mode is None and view:
            assembly.mode = view[0]
            view = view[1:]
        if assembly.chunked and assembly.mode != 0:
            assembly.split_header += view[: 64 - len(assembly.split_header)]  # a split header is 32 bytes
            return
        assembly.fed += len(view)
        assembly.walker.feed(view)

    def _split_header(self, key: tuple[str, ...], total: int, events: list[Event]) -> None:
        """The object's slices must all have been inspected by the time its header passes."""
        akey = ("split", *key)
        assembly = self._assemblies.get(akey)
        fed = assembly.fed if assembly is not None else 0
        if assembly is not None and fed == total and not assembly.pending:
            assembly.walker.close()
            events.extend(assembly.walker.events())
            self._drop(akey, "")
        elif fed > total:
            events.append(Malformed("fate", f"object is over {fed} bytes, its split header says {total}"))
            self._drop(akey, "size mismatch")
        else:
            why = self._dropped.get(akey) or f"{fed} of {total} bytes inspected"
            events.append(ScanLimit("reassembly.incomplete", f"split header of {key[-2]!r} before its slices: {why}"))
            self._drop(akey, "header before slices")

    def _finish_chunks(self, key: tuple[str, ...], events: list[Event]) -> None:
        akey = ("chunks", *key)
        assembly = self._assemblies.get(akey)
        if assembly is None or assembly.pending:
            if akey not in self._dropped:
                events.append(ScanLimit("reassembly.incomplete", f"last chunk of {key[-2]!r} before the others"))
            self._drop(akey, "last chunk before the others")
            return
        if assembly.mode == 0:
            assembly.walker.close()
            events.extend(assembly.walker.events())
        elif assembly.mode == 1 and len(assembly.split_header) == K_SPLIT_HEADER.size:
            self._split_header(key, K_SPLIT_HEADER.unpack_from(assembly.split_header)[0], events)
        else:
            events.append(Malformed("fate", f"unknown object mode byte {assembly.mode}"))
        self._drop(akey, "")

    def _drop(self, akey: tuple[str, ...], reason: str) -> None:
        """Forget an assembly; with a reason, remember the key so that later pieces are rejected."""
        assembly = self._assemblies.pop(akey, None)
        if assembly is not None:
            self._pending_bytes -= sum(len(p) for p in assembly.pending.values())
        if reason:
            self._dropped[akey] = reason
            self._dropped.move_to_end(akey)
            while len(self._dropped) > K_MAX_DROPPED:
                self._dropped.popitem(last=False)

    def _expire(self, *, now: float) -> None:
        while self._assemblies:
            akey, assembly = next(iter(self._assemblies.items()))
            if now - assembly.last_seen <= self._limits.idle_timeout_s:
                break
            self._drop(akey, f"idle for more than {self._limits.idle_timeout_s:g} s")


_OSX_TAGS = {0x0A: 0, 0x12: 1, 0x1A: 2}  # Message fields 1 msgId (string), 2 head, 3 body: length-delimited


def _osx_message(payload: bytes) -> tuple[bytes, memoryview] | None:
    """(head, body view) of a serialized ``org.ppc.ptp.Message``, read without copying the body.

    Only the plain shape is read here: nothing but fields 1-3, each length-delimited (a repeated one:
    the last wins, as protobuf does), every ``msgId`` ASCII, every length within the bytes. Anything else
    (other fields or wire types, a truncated field, a non-ASCII ``msgId``) returns None, and the
    caller lets protobuf parse it (``Message.FromString``), so both agree on every input.
    """
    if type(payload) is not bytes:
        return None  # a bytearray or view (not what the fronts build): protobuf reads it
    spans = [(0, 0), (0, 0), (0, 0)]
    pos, size = 0, len(payload)
    while pos < size:
        field = _OSX_TAGS.get(payload[pos])
        if field is None:
            return None
        pos += 1
        length = shift = 0
        while True:
            if pos >= size or shift > 28:
                return None
            byte = payload[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        end = pos + length
        if end > size or (field == 0 and not payload[pos:end].isascii()):  # protobuf checks every msgId
            return None
        spans[field] = (pos, end)
        pos = end
    _, (head_start, head_end), (body_start, body_end) = spans
    return payload[head_start:head_end], memoryview(payload)[body_start:body_end]


_JSON_DECODE = json.JSONDecoder().decode  # what json.loads uses for a str without hooks


def _json_head(raw: bytes) -> object:
    """``json.loads(raw)``: a head that starts with ``{`` and a non-NUL byte is UTF-8 by json's own
    ``detect_encoding`` rule, so it is decoded directly; anything else goes through ``json.loads``."""
    if raw[:1] == b"{" and raw[1:2] != b"\x00":
        return _JSON_DECODE(raw.decode("utf-8", "surrogatepass"))
    return json.loads(raw)


def _json_pairs(body: bytes, events: list[Event]) -> list[tuple[bytes, bytes]]:
    """A table message's rows (JSON list of hex k/v); a Malformed event and no rows when it is not one."""
    try:
        rows = json.loads(body)
        if not isinstance(rows, list):
            raise ValueError("not a JSON list")
        return [(bytes.fromhex(r["k"]), bytes.fromhex(r["v"])) for r in rows]
    except (ValueError, TypeError, KeyError) as exc:
        events.append(Malformed("table", f"not a JSON list of hex k/v pairs: {exc}"))
        return []


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
