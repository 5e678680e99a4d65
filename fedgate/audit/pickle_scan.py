"""An incremental pickle opcode walker that never unpickles.

It reads opcodes with the descriptors of :mod:`pickletools` (the table ``genops`` uses) and runs a
*symbolic* stack machine: every value is a small description (a string, an int, a list of such, "an
object of class X"), never a Python object built from the data. That is enough to see

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

import contextlib
import hashlib
import io
import pickletools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn

from fedgate.audit.events import (
    EncryptedTensorFound,
    Event,
    GlobalImported,
    KeyFound,
    Malformed,
    ScanLimit,
)
from fedgate.audit.safetensors_scan import SafetensorsScanner, looks_like_safetensors

__all__ = ["PickleLimits", "PickleWalker", "decode_bincode_modulus"]

K_SNIFF = 10  # bytes of a long argument kept to recognise safetensors
K_MAX_KEY_STATE = 1 << 16  # ints of a key's state list decoded (a 16384-bit key needs ~4,100)
K_SEARCH_NODES = 2000  # containers/objects visited when looking for keys inside a PHETensor's state
K_SEARCH_ITEMS = 1 << 20  # child references examined in that search
_COMPOSITE = frozenset({"list", "tuple", "dict", "set", "obj", "opaque"})

_OPS: Mapping[int, pickletools.OpcodeInfo] = MappingProxyType({ord(op.code): op for op in pickletools.opcodes})
_BYTES_OPS = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"})
_STR_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
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


class _Sym:
    """A symbolic value: what the unpickler would have built, described, not built."""

    __slots__ = ("args", "cls", "count", "items", "key", "kind", "state", "value")

    def __init__(self, kind: str, value: Any = None) -> None:
        self.kind = kind  # const | int | str | bytes | list | tuple | dict | set | global | obj | opaque
        self.value = value
        self.items: list[Any] = []
        self.count = 0
        self.cls: tuple[str, str] | None = None
        self.args: _Sym | None = None
        self.state: _Sym | None = None
        self.key: KeyFound | None = None


def decode_bincode_modulus(state: bytes) -> int | None:
    """The first big integer of a ``fate_utils`` PK state (``u32 radix | u64 len | digits``), or None."""
    if len(state) < 12:
        return None
    radix = int.from_bytes(state[0:4], "little")
    length = int.from_bytes(state[4:12], "little")
    if radix not in (2, 8, 10, 16, 36) or not 0 < length <= len(state) - 12:
        return None
    try:
        return int(state[12 : 12 + length].decode("ascii"), radix)
    except (UnicodeDecodeError, ValueError):
        return None


class PickleWalker:
    """Walk one pickle fed in pieces; see the module docstring."""

    def __init__(self, *, limits: PickleLimits = PickleLimits()) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._events: list[Event] = []
        self._stack: list[_Sym] = []
        self._marks: list[int] = []
        self._memo: dict[int, _Sym] = {}
        self._seen_globals: set[tuple[str, str, bool]] = set()
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
        events, self._events = self._events, []
        return events

    def feed(self, data: bytes | memoryview) -> None:
        """Accept the next piece of the pickle."""
        if not data:
            return
        self.consumed += len(data)
        if self._state == "done":
            self._error("trailing bytes after STOP")
            return
        if self._state == "error":
            return
        self._buf += data
        with contextlib.suppress(_Stop):
            self._run()
        if self._state == "done" and self._buf:
            self._state = "error"
            self._events.append(Malformed("pickle", "trailing bytes after STOP"))

    def close(self) -> None:
        """The pickle's bytes are all in; a walk that has not reached STOP is reported as truncated."""
        if self._state == "run":
            self._state = "error"
            self._events.append(Malformed("pickle", f"truncated after {self.consumed} bytes"))

    # -- the opcode loop --------------------------------------------------------------------------

    def _run(self) -> None:
        buf = self._buf
        pos = 0
        try:
            while self._state == "run":
                if self._stream_left:
                    pos = self._stream(pos)
                    if self._stream_left:
                        return
                    continue
                if pos >= len(buf):
                    return
                op = _OPS.get(buf[pos])
                if op is None:
                    self._error(f"unknown opcode 0x{buf[pos]:02x} at byte {self.consumed - len(buf) + pos}")
                arg = op.arg
                if arg is None:
                    pos += 1
                    self._dispatch(op.name, None)
                    continue
                n = arg.n
                if n >= 0:
                    if pos + 1 + n > len(buf):
                        return
                    value = arg.reader(io.BytesIO(bytes(buf[pos + 1 : pos + 1 + n])))
                    pos += 1 + n
                    self._dispatch(op.name, value)
                    continue
                if n == pickletools.UP_TO_NEWLINE:
                    lines = 2 if arg.name == "stringnl_noescape_pair" else 1
                    end = pos + 1
                    for _ in range(lines):
                        nl = buf.find(b"\n", end)
                        if nl < 0:
                            if len(buf) - pos > self._limits.max_line_bytes:
                                self._limit("line", f"{op.name} argument longer than {self._limits.max_line_bytes}")
                            return
                        end = nl + 1
                    try:
                        value = arg.reader(io.BytesIO(bytes(buf[pos + 1 : end])))
                    except ValueError as exc:
                        self._error(f"{op.name}: {exc}")
                    pos = end
                    self._dispatch(op.name, value)
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
                    value = arg.reader(io.BytesIO(bytes(buf[pos : pos + 1 + width + length])[1:]))
                    pos += 1 + width + length
                    self._dispatch(op.name, value)
                    continue
                if op.name not in _BYTES_OPS and op.name not in _STR_OPS:
                    self._limit("argument", f"{op.name} argument of {length} bytes")
                pos += 1 + width
                self._stream_op, self._stream_left, self._stream_len = op.name, length, length
                self._stream_head.clear()
                self._stream_sink = None
        finally:
            del buf[:pos]

    def _stream(self, pos: int) -> int:
        """Consume as much of the long argument as is buffered; returns the new position."""
        take = min(self._stream_left, len(self._buf) - pos)
        if take <= 0:
            return pos
        piece = bytes(self._buf[pos : pos + take])
        if self._stream_op in _BYTES_OPS:
            offset = self._stream_len - self._stream_left
            rest = piece
            if offset < K_SNIFF:  # still collecting the first bytes to recognise safetensors
                self._stream_head += piece[: K_SNIFF - offset]
                rest = piece[K_SNIFF - offset :]
                if len(self._stream_head) >= K_SNIFF and looks_like_safetensors(
                    bytes(self._stream_head), self._stream_len
                ):
                    self._stream_sink = SafetensorsScanner(self._stream_len)
                    self._stream_sink.feed(bytes(self._stream_head))
            if self._stream_sink is not None and rest:
                self._stream_sink.feed(rest)
        self._stream_left -= take
        pos += take
        if not self._stream_left:
            if self._stream_sink is not None:
                self._events.extend(self._stream_sink.finish())
            self._stream_sink = None
            self._push(_Sym("bytes" if self._stream_op in _BYTES_OPS else "str", None))
        return pos

    # -- helpers ----------------------------------------------------------------------------------

    def _error(self, detail: str) -> NoReturn:
        self._state = "error"
        self._events.append(Malformed("pickle", detail))
        raise _Stop

    def _limit(self, limit: str, detail: str) -> NoReturn:
        self._state = "error"
        self._events.append(ScanLimit(f"pickle.{limit}", detail))
        raise _Stop

    def _push(self, sym: _Sym) -> None:
        if len(self._stack) >= self._limits.max_stack:
            self._limit("stack", f"more than {self._limits.max_stack} values on the stack")
        self._stack.append(sym)

    def _pop(self) -> _Sym:
        if not self._stack or (self._marks and len(self._stack) <= self._marks[-1]):
            self._error("stack underflow")
        return self._stack.pop()

    def _top(self) -> _Sym:
        if not self._stack or (self._marks and len(self._stack) <= self._marks[-1]):
            self._error("stack underflow")
        return self._stack[-1]

    def _pop_mark(self) -> list[_Sym]:
        if not self._marks:
            self._error("no MARK on the stack")
        at = self._marks.pop()
        items = self._stack[at:]
        del self._stack[at:]
        return items

    def _add_items(self, container: _Sym, items: list[Any]) -> None:
        room = self._limits.max_items - len(container.items)
        if room > 0:
            container.items.extend(items[:room])
        container.count += len(items)

    def _import(self, module: str, name: str, *, called: bool = False) -> _Sym:
        key = (module, name, called)
        if key not in self._seen_globals:
            self._seen_globals.add(key)
            self._events.append(GlobalImported(module, name, called))
        sym = _Sym("global")
        sym.cls = (module, name)
        return sym

    def _instantiate(self, cls: _Sym, args: _Sym | None) -> _Sym:
        obj = _Sym("obj")
        if cls.kind == "global" and cls.cls is not None:
            self._import(cls.cls[0], cls.cls[1], called=True)
            obj.cls = cls.cls
        obj.args = args
        return obj

    def _dispatch(self, name: str, arg: Any) -> None:
        handler = getattr(self, "_op_" + name, None)
        if handler is None:
            self._dispatch_const(name, arg)
        else:
            handler(arg)

    def _dispatch_const(self, name: str, arg: Any) -> None:
        if name in _BYTES_OPS:
            sym = _Sym("bytes", len(arg))
            if looks_like_safetensors(bytes(arg[:K_SNIFF]), len(arg)):
                scanner = SafetensorsScanner(len(arg))
                scanner.feed(bytes(arg))
                self._events.extend(scanner.finish())
            self._push(sym)
        elif name in _STR_OPS:
            self._push(_Sym("str", arg if isinstance(arg, str) else None))
        elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
            self._push(_Sym("int", arg) if isinstance(arg, int) and not isinstance(arg, bool) else _Sym("const"))
        elif name in ("NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT", "NEXT_BUFFER"):
            self._push(_Sym("const", arg))
        else:
            self._error(f"unhandled opcode {name}")

    # -- opcode handlers (names follow pickletools) ------------------------------------------------

    def _op_PROTO(self, arg: Any) -> None:
        if not isinstance(arg, int) or arg > 5:
            self._error(f"unsupported protocol {arg!r}")

    def _op_FRAME(self, arg: Any) -> None:
        pass  # frames only group opcodes; the walk is already incremental

    def _op_STOP(self, arg: Any) -> None:
        self._pop()
        self._state = "done"
        raise _Stop

    def _op_MARK(self, arg: Any) -> None:
        if len(self._marks) >= self._limits.max_stack:
            self._limit("stack", "too many MARKs")
        self._marks.append(len(self._stack))

    def _op_POP(self, arg: Any) -> None:
        if self._marks and len(self._stack) == self._marks[-1]:
            self._marks.pop()  # POP of a bare mark, as pickle does
        else:
            self._pop()

    def _op_POP_MARK(self, arg: Any) -> None:
        self._pop_mark()

    def _op_DUP(self, arg: Any) -> None:
        self._push(self._top())

    def _op_READONLY_BUFFER(self, arg: Any) -> None:
        self._top()

    def _op_EMPTY_LIST(self, arg: Any) -> None:
        self._push(_Sym("list"))

    def _op_EMPTY_DICT(self, arg: Any) -> None:
        self._push(_Sym("dict"))

    def _op_EMPTY_SET(self, arg: Any) -> None:
        self._push(_Sym("set"))

    def _op_EMPTY_TUPLE(self, arg: Any) -> None:
        self._push(_Sym("tuple"))

    def _collect(self, kind: str, items: list[Any]) -> None:
        sym = _Sym(kind)
        self._add_items(sym, items)
        self._push(sym)

    def _op_LIST(self, arg: Any) -> None:
        self._collect("list", self._pop_mark())

    def _op_TUPLE(self, arg: Any) -> None:
        self._collect("tuple", self._pop_mark())

    def _op_FROZENSET(self, arg: Any) -> None:
        self._collect("set", self._pop_mark())

    def _op_TUPLE1(self, arg: Any) -> None:
        self._collect("tuple", [self._pop()])

    def _op_TUPLE2(self, arg: Any) -> None:
        b, a = self._pop(), self._pop()
        self._collect("tuple", [a, b])

    def _op_TUPLE3(self, arg: Any) -> None:
        c, b, a = self._pop(), self._pop(), self._pop()
        self._collect("tuple", [a, b, c])

    def _op_DICT(self, arg: Any) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            self._error("DICT with an odd number of items")
        self._collect("dict", [(items[i], items[i + 1]) for i in range(0, len(items), 2)])

    def _op_APPEND(self, arg: Any) -> None:
        value = self._pop()
        self._add_items(self._top(), [value])

    def _op_APPENDS(self, arg: Any) -> None:
        items = self._pop_mark()
        self._add_items(self._top(), items)

    def _op_ADDITEMS(self, arg: Any) -> None:
        self._op_APPENDS(arg)

    def _op_SETITEM(self, arg: Any) -> None:
        value, key = self._pop(), self._pop()
        self._add_items(self._top(), [(key, value)])

    def _op_SETITEMS(self, arg: Any) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            self._error("SETITEMS with an odd number of items")
        self._add_items(self._top(), [(items[i], items[i + 1]) for i in range(0, len(items), 2)])

    def _op_GLOBAL(self, arg: Any) -> None:
        module, _, name = str(arg).partition(" ")
        self._push(self._import(module, name))

    def _op_STACK_GLOBAL(self, arg: Any) -> None:
        name, module = self._pop(), self._pop()
        if module.kind != "str" or name.kind != "str" or module.value is None or name.value is None:
            self._push(self._import("<dynamic>", "<dynamic>"))
        else:
            self._push(self._import(module.value, name.value))

    def _op_INST(self, arg: Any) -> None:
        module, _, name = str(arg).partition(" ")
        args = _Sym("tuple")
        self._add_items(args, self._pop_mark())
        self._push(self._instantiate(self._import(module, name), args))

    def _op_OBJ(self, arg: Any) -> None:
        items = self._pop_mark()
        if not items:
            self._error("OBJ without a class")
        args = _Sym("tuple")
        self._add_items(args, items[1:])
        self._push(self._instantiate(items[0], args))

    def _ext(self, code: Any) -> None:
        self._push(self._import("<copyreg extension>", str(code)))

    def _op_EXT1(self, arg: Any) -> None:
        self._ext(arg)

    def _op_EXT2(self, arg: Any) -> None:
        self._ext(arg)

    def _op_EXT4(self, arg: Any) -> None:
        self._ext(arg)

    def _op_REDUCE(self, arg: Any) -> None:
        args, func = self._pop(), self._pop()
        self._push(self._instantiate(func, args))

    def _op_NEWOBJ(self, arg: Any) -> None:
        args, cls = self._pop(), self._pop()
        self._push(self._instantiate(cls, args))

    def _op_NEWOBJ_EX(self, arg: Any) -> None:
        self._pop()  # kwargs
        args, cls = self._pop(), self._pop()
        self._push(self._instantiate(cls, args))

    def _op_BUILD(self, arg: Any) -> None:
        state = self._pop()
        obj = self._top()
        obj.state = state
        if obj.kind == "obj" and obj.cls is not None:
            self._recognise(obj)

    def _op_PERSID(self, arg: Any) -> None:
        self._push(_Sym("opaque", "persistent id"))

    def _op_BINPERSID(self, arg: Any) -> None:
        pid = self._pop()
        sym = _Sym("opaque", "persistent id")
        sym.state = pid
        self._push(sym)

    def _memo_put(self, index: Any) -> None:
        if not isinstance(index, int) or index < 0:
            self._error(f"bad memo index {index!r}")
        if len(self._memo) >= self._limits.max_memo and index not in self._memo:
            self._limit("memo", f"more than {self._limits.max_memo} memo entries")
        self._memo[index] = self._top()

    def _memo_get(self, index: Any) -> None:
        sym = self._memo.get(index) if isinstance(index, int) else None
        if sym is None:
            self._error(f"memo index {index!r} was never stored")
        self._push(sym)

    def _op_PUT(self, arg: Any) -> None:
        self._memo_put(arg)

    def _op_BINPUT(self, arg: Any) -> None:
        self._memo_put(arg)

    def _op_LONG_BINPUT(self, arg: Any) -> None:
        self._memo_put(arg)

    def _op_MEMOIZE(self, arg: Any) -> None:
        self._memo_put(len(self._memo))

    def _op_GET(self, arg: Any) -> None:
        self._memo_get(arg)

    def _op_BINGET(self, arg: Any) -> None:
        self._memo_get(arg)

    def _op_LONG_BINGET(self, arg: Any) -> None:
        self._memo_get(arg)

    # -- FATE object recognition ------------------------------------------------------------------

    def _recognise(self, obj: _Sym) -> None:
        assert obj.cls is not None and obj.state is not None
        module, name = obj.cls
        if module.startswith("fate_utils.") and name == "PK":
            obj.key = self._decode_key(module.split(".", 1)[1], obj.state)
            self._events.append(obj.key)
        elif module.startswith("fate.") and name == "PHETensor":
            keys = self._keys_in(obj.state)
            self._events.append(
                EncryptedTensorFound(
                    cls=f"{module}.{name}",
                    key_bits=tuple(k.bits for k in keys),
                    shape=_shape_in(obj.state),
                )
            )

    @staticmethod
    def _decode_key(scheme: str, state: _Sym) -> KeyFound:
        ints = state.items if state.kind == "list" and state.count <= K_MAX_KEY_STATE else []
        if ints and all(isinstance(i, _Sym) and i.kind == "int" and 0 <= i.value <= 255 for i in ints):
            n = decode_bincode_modulus(bytes(i.value for i in ints))
            if n is not None:
                digits = format(n, "x").encode()
                return KeyFound(scheme, n.bit_length(), hashlib.sha256(digits).hexdigest()[:16])
        return KeyFound(scheme, 0, "")

    @staticmethod
    def _keys_in(root: _Sym) -> list[KeyFound]:
        """Keys reachable from ``root`` through containers and object states (bounded search)."""
        found: list[KeyFound] = []
        seen: set[int] = set()
        todo: list[_Sym] = [root]
        budget = K_SEARCH_ITEMS
        while todo and len(seen) < K_SEARCH_NODES and budget > 0:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.key is not None:
                found.append(node.key)
                continue
            children: list[Any] = [node.state, node.args, *node.items]
            budget -= len(children)
            for child in children:
                for sym in child if isinstance(child, tuple) else (child,):
                    # scalars cannot hold a key: only descend into containers and objects
                    if isinstance(sym, _Sym) and sym.kind in _COMPOSITE:
                        todo.append(sym)
        return found


def _shape_in(state: _Sym) -> tuple[int, ...] | None:
    """``_shape`` / ``shape`` from a BUILD state dict: a tuple of ints or ``torch.Size((...))``."""
    if state.kind != "dict":
        return None
    for pair in state.items:
        key, value = pair
        if key.kind == "str" and key.value in ("_shape", "shape"):
            if value.kind == "obj" and value.args is not None and value.args.items:
                value = value.args.items[0]
            if value.kind in ("tuple", "list") and all(i.kind == "int" for i in value.items):
                return tuple(int(i.value) for i in value.items)
    return None


class _Stop(Exception):
    """Internal: unwinds the opcode loop when the walk ends or fails."""
