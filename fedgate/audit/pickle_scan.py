"""An incremental pickle opcode walker that never unpickles.

It reads opcodes with the descriptors of :mod:`pickletools` (the table ``genops`` uses) and feeds
them to the symbolic machine of :mod:`fedgate.audit.pickle_machine`: every value is a small
description (a string, an int, a list of such, "an object of class X"), never a Python object built
from the data. That is enough to see

* every global the pickle would import (GLOBAL, STACK_GLOBAL, INST, EXT*) and whether it is called;
* FATE's homomorphic-encryption public keys: a ``fate_utils.<scheme>.PK`` object whose BUILD state is
  a list of small ints holding bincode bytes ``u32 LE radix | u64 LE length | ASCII digits`` per big
  integer, the first being the modulus n (FATE wire facts, section 6);
* encrypted tensors (``fate.*.PHETensor``) and the key(s) inside their state;
* safetensors blobs in any bytes argument (FATE's torch/numpy persistent ids), streamed to
  :class:`~fedgate.audit.safetensors_scan.SafetensorsScanner`.

Rules of this module:

1. Pure and incremental: ``feed()`` accepts the pickle in pieces of any size (chunk boundaries fall
   anywhere, inside an opcode too), ``close()`` marks its end, ``events()`` pulls what was found.
2. Bounded: arguments above ``inline_arg_bytes`` are streamed, not buffered (only the first bytes
   are kept for sniffing); memo, stack and per-container item counts are capped. Hitting a cap emits
   :class:`ScanLimit` and stops the walk; a protocol violation emits :class:`Malformed` and stops it.
   After either, further input is ignored (the walker stays in its error state).
3. Nothing from the payload is ever imported, called or evaluated: no ``pickle.loads``, no
   ``find_class``, no ``eval``; argument decoding goes through pickletools' pure readers only.
"""

from __future__ import annotations

import io
import pickletools
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from fedgate.audit.events import Event, Malformed, ScanLimit
from fedgate.audit.pickle_machine import SymbolicMachine, WalkError, WalkLimit, decode_bincode_modulus, handler_for
from fedgate.audit.safetensors_scan import SafetensorsScanner, looks_like_safetensors

__all__ = ["PickleLimits", "PickleWalker", "decode_bincode_modulus"]  # decode_bincode_modulus: re-export

K_SNIFF = 10  # bytes of a long argument kept to recognise safetensors
_BININT1_RUN = re.compile(rb"(?:K.)+", re.DOTALL)  # consecutive BININT1 opcodes with their byte
_NEWLINE = re.compile(rb"\n")  # bytes.find(b"\n", pos) that also works on a memoryview

_OP_TABLE: tuple[pickletools.OpcodeInfo | None, ...] = tuple(
    next((op for op in pickletools.opcodes if ord(op.code) == code), None) for code in range(256)
)
# Fixed-width arguments (BININT, BININT2, BINFLOAT, LONG_BINGET/PUT, EXT2/4, FRAME) decoded in place with the
# same struct formats as pickletools' readers (read_int4 "<i", read_uint2 "<H", read_uint4 "<I",
# read_uint8 "<Q", read_float8 ">d"); any other reader goes through _read.
_FIXED_FORMATS: dict[Callable[..., Any], struct.Struct] = {
    pickletools.read_int4: struct.Struct("<i"),
    pickletools.read_uint2: struct.Struct("<H"),
    pickletools.read_uint4: struct.Struct("<I"),
    pickletools.read_uint8: struct.Struct("<Q"),
    pickletools.read_float8: struct.Struct(">d"),
}
_FIXED_READ: tuple[struct.Struct | None, ...] = tuple(
    _FIXED_FORMATS.get(op.arg.reader) if op is not None and op.arg is not None and op.arg.n > 1 else None
    for op in _OP_TABLE
)
_BYTES_OPS = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"})
# per opcode byte: the machine's handler (resolved once, not by name per opcode) and "is a bytes argument"
_OP_STEP = tuple(handler_for(op.name) if op is not None else None for op in _OP_TABLE)
_OP_BYTES = tuple(op is not None and op.name in _BYTES_OPS for op in _OP_TABLE)
_STR_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_UTF8_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})  # decoded as pickletools does
_LEN_PREFIX = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


@dataclass(frozen=True, slots=True)
class PickleLimits:
    """Bounds of one walk."""

    inline_arg_bytes: int = 64 * 1024
    """Arguments up to this size (bytes) are buffered whole; longer ones are streamed."""
    max_line_bytes: int = 64 * 1024
    """Longest newline-terminated argument (GLOBAL, INT, ...), in bytes."""
    max_memo: int = 100_000
    """Memo entries."""
    max_stack: int = 100_000
    """Symbolic stack depth (marks included)."""
    max_items: int = 1 << 16
    """Items remembered per container; more are only counted."""


class PickleWalker:
    """Walk one pickle fed in pieces; see the module docstring."""

    def __init__(self, *, limits: PickleLimits = PickleLimits()) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._pos = 0
        self._events: list[Event] = []
        self._machine = SymbolicMachine(
            self._events, max_memo=limits.max_memo, max_stack=limits.max_stack, max_items=limits.max_items
        )
        self._state = "run"  # run | done | error
        # a long argument being streamed: opcode name, bytes left, sniff prefix, safetensors sink
        self._stream_op = ""
        self._stream_left = 0
        self._stream_len = 0
        self._stream_head = bytearray()
        self._stream_sink: SafetensorsScanner | None = None
        self.consumed = 0
        """Bytes of input accepted so far."""

    @property
    def done(self) -> bool:
        """True once STOP was read (or the walk failed)."""
        return self._state != "run"

    @property
    def failed(self) -> bool:
        return self._state == "error"

    def events(self) -> list[Event]:
        """Pull (and forget) the events found so far."""
        events = list(self._events)
        self._events.clear()  # the list is shared with the machine
        return events

    def feed(self, data: bytes | memoryview, *, skip: int = 0) -> None:
        """Accept the next piece of the pickle; the first ``skip`` bytes of ``data`` are not part of it
        (FATE's mode byte: passing it this way spares copying a large object)."""
        if len(data) <= skip:
            return
        self.consumed += len(data) - skip
        if self._state == "error":
            return
        # a whole pickle in one piece (the common case) is walked in place, without a copy
        buf: bytes | bytearray | memoryview
        if self._buf:
            self._buf += memoryview(data)[skip:]
            buf, skip = self._buf, 0
        elif isinstance(data, bytes) or (data.format == "B" and data.ndim == 1 and data.c_contiguous):
            buf = data  # a view of the caller's bytes (a message body) is walked in place too
        else:
            buf = bytes(data)
        self._pos = skip
        try:
            if self._state == "run":
                self._run(buf)
        except _Stop:
            pass
        except WalkError as exc:
            self._state = "error"
            self._events.append(Malformed("pickle", str(exc)))
        except WalkLimit as exc:
            self._state = "error"
            self._events.append(ScanLimit(exc.limit, str(exc)))
        if buf is self._buf:
            del self._buf[: self._pos]
        else:
            self._buf = bytearray(buf[self._pos :])
        if self._state == "done" and self._buf:
            self._state = "error"
            self._events.append(Malformed("pickle", "trailing bytes after STOP"))

    def close(self) -> None:
        """The pickle's bytes are all in; a walk that has not reached STOP is reported as truncated."""
        if self._state == "run":
            self._state = "error"
            self._events.append(Malformed("pickle", f"truncated after {self.consumed} bytes"))

    # -- the opcode loop --------------------------------------------------------------------------

    def _run(self, buf: bytes | bytearray | memoryview) -> None:
        pos = self._pos
        try:
            while self._state == "run":
                if self._stream_left:
                    pos = self._stream(buf, pos)
                    if self._stream_left:
                        return
                    continue
                if pos >= len(buf):
                    return
                code = buf[pos]
                if code == 0x4B:  # BININT1: FATE keys and ciphertexts are long runs of them
                    run = _BININT1_RUN.match(buf, pos)
                    if run is None:
                        return  # the byte argument has not arrived yet
                    self._machine.push_ints(bytes(buf[pos + 1 : run.end() : 2]))
                    pos = run.end()
                    continue
                op = _OP_TABLE[code]
                if op is None:
                    self._error(f"unknown opcode 0x{buf[pos]:02x} at byte {self.consumed - len(buf) + pos}")
                arg = op.arg
                if arg is None:
                    pos += 1
                    self._step(code, None)
                    continue
                n = arg.n
                if n >= 0:
                    if pos + 1 + n > len(buf):
                        return
                    value: Any
                    if n == 1:
                        value = buf[pos + 1]
                    else:
                        fixed = _FIXED_READ[code]
                        value = (fixed.unpack_from(buf, pos + 1)[0] if fixed is not None
                                 else self._read(op, bytes(buf[pos + 1 : pos + 1 + n])))
                    pos += 1 + n
                    self._step(code, value)
                    continue
                if n == pickletools.UP_TO_NEWLINE:
                    lines = 2 if arg.name == "stringnl_noescape_pair" else 1
                    end = pos + 1
                    for _ in range(lines):
                        found = _NEWLINE.search(buf, end)
                        if found is None:
                            if len(buf) - pos > self._limits.max_line_bytes:
                                self._limit("line", f"{op.name} argument longer than {self._limits.max_line_bytes}")
                            return
                        end = found.end()
                    value = self._read(op, bytes(buf[pos + 1 : end]))
                    pos = end
                    self._step(code, value)
                    continue
                width, signed = _LEN_PREFIX[n]
                if pos + 1 + width > len(buf):
                    return
                length = int.from_bytes(buf[pos + 1 : pos + 1 + width], "little", signed=signed)
                if length < 0:
                    self._error(f"{op.name}: negative length")
                if length <= self._limits.inline_arg_bytes:
                    if pos + 1 + width + length > len(buf):
                        return
                    start = pos + 1 + width
                    if op.name in _BYTES_OPS:
                        value = bytes(buf[start : start + length])
                    elif op.name in _UTF8_OPS:
                        try:
                            value = str(buf[start : start + length], "utf-8", "surrogatepass")
                        except UnicodeDecodeError as exc:
                            self._error(f"{op.name}: {exc}")
                    else:
                        value = self._read(op, bytes(buf[pos + 1 : start + length]))
                    pos = start + length
                    self._step(code, value)
                    continue
                if op.name not in _BYTES_OPS and op.name not in _STR_OPS:
                    self._limit("argument", f"{op.name} argument of {length} bytes")
                pos += 1 + width
                self._stream_op, self._stream_left, self._stream_len = op.name, length, length
                self._stream_head.clear()
                self._stream_sink = None
        finally:
            self._pos = pos  # feed() drops what was consumed

    def _stream(self, buf: bytes | bytearray | memoryview, pos: int) -> int:
        """Consume as much of the long argument as is buffered; returns the new position."""
        take = min(self._stream_left, len(buf) - pos)
        if take <= 0:
            return pos
        if self._stream_op in _BYTES_OPS:
            # views, not copies; released here so that feed() may trim a bytearray buffer afterwards
            with memoryview(buf) as whole, whole[pos : pos + take] as piece:
                offset = self._stream_len - self._stream_left
                skip = 0
                if offset < K_SNIFF:  # still collecting the first bytes to recognise safetensors
                    skip = K_SNIFF - offset
                    self._stream_head += piece[:skip]
                    if len(self._stream_head) >= K_SNIFF and looks_like_safetensors(
                        bytes(self._stream_head), self._stream_len
                    ):
                        self._stream_sink = SafetensorsScanner(self._stream_len)
                        self._stream_sink.feed(bytes(self._stream_head))
                if self._stream_sink is not None and take > skip:
                    with piece[skip:] as rest:
                        self._stream_sink.feed(rest)
        self._stream_left -= take
        pos += take
        if not self._stream_left:
            if self._stream_sink is not None:
                self._events.extend(self._stream_sink.finish())
            self._stream_sink = None
            if self._stream_op in _BYTES_OPS:
                self._machine.dispatch("BINBYTES8", b"")
            else:
                self._machine.dispatch("BINUNICODE8", None)
        return pos

    # -- helpers ----------------------------------------------------------------------------------

    def _read(self, op: pickletools.OpcodeInfo, raw: bytes) -> Any:
        """Decode one argument with pickletools' pure reader; a bad one ends the walk as Malformed."""
        assert op.arg is not None
        try:
            return op.arg.reader(io.BytesIO(raw))
        except (ValueError, OverflowError, AssertionError) as exc:  # UnicodeDecodeError is a ValueError
            self._error(f"{op.name}: {exc}")

    def _step(self, code: int, arg: Any) -> None:
        """One decoded opcode (by its byte) into the machine; a bytes argument is sniffed for safetensors."""
        if _OP_BYTES[code] and looks_like_safetensors(bytes(arg[:K_SNIFF]), len(arg)):
            scanner = SafetensorsScanner(len(arg))
            scanner.feed(bytes(arg))
            self._events.extend(scanner.finish())
        machine = self._machine
        step = _OP_STEP[code]
        assert step is not None  # _run rejects unknown opcode bytes first
        step(machine, arg)  # WalkError / WalkLimit unwind to feed()
        if machine.stopped:
            self._state = "done"
            raise _Stop

    def _error(self, detail: str) -> NoReturn:
        self._state = "error"
        self._events.append(Malformed("pickle", detail))
        raise _Stop

    def _limit(self, limit: str, detail: str) -> NoReturn:
        self._state = "error"
        self._events.append(ScanLimit(f"pickle.{limit}", detail))
        raise _Stop


class _Stop(Exception):
    """Internal: unwinds the opcode loop when the walk ends or fails."""
