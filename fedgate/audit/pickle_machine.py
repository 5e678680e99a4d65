"""The symbolic pickle machine: what the unpickler would build, described, never built.

:class:`SymbolicMachine` receives decoded opcodes (name and argument, from
:mod:`fedgate.audit.pickle_scan`) and keeps a stack and memo of small descriptions: a string, an
int, a container of such, "an object of class X". That is enough to report every global the pickle
would import (and whether it is called), to decode FATE's HE public keys (a
``fate_utils.<scheme>.PK`` object whose BUILD state is a list of byte-sized ints holding bincode
``u32 LE radix | u64 LE length | ASCII digits`` per big integer, the first being n) and to find the
key(s) inside encrypted tensors (``fate.*.PHETensor``).

Rules of this module:

1. Pure: nothing from the payload is imported, called or evaluated.
2. Small ints are kept on the stack and in containers as plain Python ints (a FATE key state or a
   ciphertext vector is thousands of them); everything else is a :class:`Sym`.
3. Bounds (memo entries, stack depth, items kept per container) raise :class:`WalkLimit`; a protocol
   violation raises :class:`WalkError`. The caller turns both into events and stops.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from fedgate.audit.events import EncryptedTensorFound, Event, GlobalImported, KeyFound

__all__ = ["Sym", "SymbolicMachine", "WalkError", "WalkLimit", "decode_bincode_modulus", "handler_for"]

K_MAX_KEY_STATE = 1 << 16  # ints of a key's state list decoded (a 16384-bit key needs ~4,100)
K_SEARCH_NODES = 2000  # containers/objects visited when looking for keys inside a PHETensor's state
K_SEARCH_ITEMS = 1 << 20  # child references examined in that search

_COMPOSITE = frozenset({"list", "tuple", "dict", "set", "obj", "opaque"})
_INT_OPS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_CONST_OPS = frozenset({"NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT", "NEXT_BUFFER"})


class WalkError(Exception):
    """The pickle violates the protocol (the unpickler would fail too)."""


class WalkLimit(Exception):
    """The pickle exceeds one of the machine's bounds; ``limit`` names it."""

    def __init__(self, limit: str, detail: str) -> None:
        super().__init__(detail)
        self.limit = limit


class Sym:
    """A symbolic value."""

    __slots__ = ("args", "cls", "count", "items", "key", "kind", "state", "value")

    def __init__(self, kind: str, value: Any = None) -> None:
        self.kind = kind  # const | int | str | bytes | list | tuple | dict | set | global | obj | opaque
        self.value = value
        self.items: list[Any] = []
        self.count = 0
        self.cls: tuple[str, str] | None = None
        self.args: Sym | None = None
        self.state: Any = None
        self.key: KeyFound | None = None


def _sym(value: Any) -> Sym:
    """A stack entry as a Sym (plain ints are kept raw on the stack for speed)."""
    return value if isinstance(value, Sym) else Sym("int", value)


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


class SymbolicMachine:
    """Stack, memo and marks of one pickle; ``dispatch`` one opcode at a time."""

    def __init__(self, events: list[Event], *, max_memo: int, max_stack: int, max_items: int) -> None:
        self._max_memo = max_memo
        self._max_stack = max_stack
        self._max_items = max_items
        self.stack: list[Any] = []
        self._marks: list[int] = []
        self._memo: dict[int, Any] = {}
        self._seen_globals: set[tuple[str, str, bool]] = set()
        self.events = events
        """Where findings are appended (the caller's list)."""
        self.stopped = False

    # -- entry points -------------------------------------------------------------------------------

    def dispatch(self, name: str, arg: Any) -> None:
        handler_for(name)(self, arg)

    def push_ints(self, values: bytes) -> None:
        """A run of BININT1 opcodes: push each byte as an int (the hot path of FATE keys)."""
        if len(self.stack) + len(values) > self._max_stack:
            raise WalkLimit("pickle.stack", f"more than {self._max_stack} values on the stack")
        self.stack.extend(values)

    def push(self, value: Any) -> None:
        if len(self.stack) >= self._max_stack:
            raise WalkLimit("pickle.stack", f"more than {self._max_stack} values on the stack")
        self.stack.append(value)

    # -- stack helpers ------------------------------------------------------------------------------

    def _pop(self) -> Any:
        if not self.stack or (self._marks and len(self.stack) <= self._marks[-1]):
            raise WalkError("stack underflow")
        return self.stack.pop()

    def _top(self) -> Any:
        if not self.stack or (self._marks and len(self.stack) <= self._marks[-1]):
            raise WalkError("stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list[Any]:
        if not self._marks:
            raise WalkError("no MARK on the stack")
        at = self._marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def _add_items(self, container: Any, items: list[Any]) -> None:
        if not isinstance(container, Sym):
            raise WalkError("adding items to an int")
        room = self._max_items - len(container.items)
        if room > 0:
            container.items.extend(items[:room])
        container.count += len(items)

    def _collect(self, kind: str, items: list[Any]) -> None:
        sym = Sym(kind)
        self._add_items(sym, items)
        self.push(sym)

    def _import(self, module: str, name: str, *, called: bool = False) -> Sym:
        key = (module, name, called)
        if key not in self._seen_globals:
            self._seen_globals.add(key)
            self.events.append(GlobalImported(module, name, called))
        sym = Sym("global")
        sym.cls = (module, name)
        return sym

    def _instantiate(self, cls: Any, args: Any) -> Sym:
        obj = Sym("obj")
        if isinstance(cls, Sym) and cls.kind == "global" and cls.cls is not None:
            self._import(cls.cls[0], cls.cls[1], called=True)
            obj.cls = cls.cls
        obj.args = _sym(args)
        return obj

    # -- opcode handlers (names follow pickletools) -------------------------------------------------

    def _op_SHORT_BINBYTES(self, arg: Any) -> None:
        self.push(Sym("bytes", len(arg)))

    _op_BINBYTES = _op_BINBYTES8 = _op_BYTEARRAY8 = _op_SHORT_BINBYTES

    def _op_SHORT_BINUNICODE(self, arg: Any) -> None:
        self.push(Sym("str", arg if isinstance(arg, str) else None))

    _op_BINUNICODE = _op_BINUNICODE8 = _op_UNICODE = _op_SHORT_BINUNICODE
    _op_STRING = _op_BINSTRING = _op_SHORT_BINSTRING = _op_SHORT_BINUNICODE

    def _op_PROTO(self, arg: Any) -> None:
        if not isinstance(arg, int) or arg > 5:
            raise WalkError(f"unsupported protocol {arg!r}")

    def _op_FRAME(self, arg: Any) -> None:
        pass  # frames only group opcodes; the walk is already incremental

    def _op_STOP(self, arg: Any) -> None:
        self._pop()
        self.stopped = True

    def _op_MARK(self, arg: Any) -> None:
        if len(self._marks) >= self._max_stack:
            raise WalkLimit("pickle.stack", "too many MARKs")
        self._marks.append(len(self.stack))

    def _op_POP(self, arg: Any) -> None:
        if self._marks and len(self.stack) == self._marks[-1]:
            self._marks.pop()  # POP of a bare mark, as pickle does
        else:
            self._pop()

    def _op_POP_MARK(self, arg: Any) -> None:
        self._pop_mark()

    def _op_DUP(self, arg: Any) -> None:
        self.push(self._top())

    def _op_READONLY_BUFFER(self, arg: Any) -> None:
        self._top()

    def _op_EMPTY_LIST(self, arg: Any) -> None:
        self.push(Sym("list"))

    def _op_EMPTY_DICT(self, arg: Any) -> None:
        self.push(Sym("dict"))

    def _op_EMPTY_SET(self, arg: Any) -> None:
        self.push(Sym("set"))

    def _op_EMPTY_TUPLE(self, arg: Any) -> None:
        self.push(Sym("tuple"))

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
            raise WalkError("DICT with an odd number of items")
        self._collect("dict", [(items[i], items[i + 1]) for i in range(0, len(items), 2)])

    def _op_APPEND(self, arg: Any) -> None:
        value = self._pop()
        self._add_items(self._top(), [value])

    def _op_APPENDS(self, arg: Any) -> None:
        items = self._pop_mark()
        self._add_items(self._top(), items)

    _op_ADDITEMS = _op_APPENDS

    def _op_SETITEM(self, arg: Any) -> None:
        value, key = self._pop(), self._pop()
        self._add_items(self._top(), [(key, value)])

    def _op_SETITEMS(self, arg: Any) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise WalkError("SETITEMS with an odd number of items")
        self._add_items(self._top(), [(items[i], items[i + 1]) for i in range(0, len(items), 2)])

    def _op_GLOBAL(self, arg: Any) -> None:
        module, _, name = str(arg).partition(" ")
        self.push(self._import(module, name))

    def _op_STACK_GLOBAL(self, arg: Any) -> None:
        name, module = _sym(self._pop()), _sym(self._pop())
        if module.kind != "str" or name.kind != "str" or module.value is None or name.value is None:
            self.push(self._import("<dynamic>", "<dynamic>"))
        else:
            self.push(self._import(module.value, name.value))

    def _op_INST(self, arg: Any) -> None:
        module, _, name = str(arg).partition(" ")
        args = Sym("tuple")
        self._add_items(args, self._pop_mark())
        self.push(self._instantiate(self._import(module, name), args))

    def _op_OBJ(self, arg: Any) -> None:
        items = self._pop_mark()
        if not items:
            raise WalkError("OBJ without a class")
        args = Sym("tuple")
        self._add_items(args, items[1:])
        self.push(self._instantiate(items[0], args))

    def _op_EXT1(self, arg: Any) -> None:
        self.push(self._import("<copyreg extension>", str(arg)))

    _op_EXT2 = _op_EXT4 = _op_EXT1

    def _op_REDUCE(self, arg: Any) -> None:
        args, func = self._pop(), self._pop()
        self.push(self._instantiate(func, args))

    def _op_NEWOBJ(self, arg: Any) -> None:
        args, cls = self._pop(), self._pop()
        self.push(self._instantiate(cls, args))

    def _op_NEWOBJ_EX(self, arg: Any) -> None:
        self._pop()  # kwargs
        args, cls = self._pop(), self._pop()
        self.push(self._instantiate(cls, args))

    def _op_BUILD(self, arg: Any) -> None:
        state = self._pop()
        obj = self._top()
        if isinstance(obj, Sym):
            obj.state = state
            if obj.kind == "obj" and obj.cls is not None:
                self._recognise(obj)

    def _op_PERSID(self, arg: Any) -> None:
        self.push(Sym("opaque", "persistent id"))

    def _op_BINPERSID(self, arg: Any) -> None:
        sym = Sym("opaque", "persistent id")
        sym.state = self._pop()
        self.push(sym)

    def _memo_put(self, index: Any) -> None:
        if not isinstance(index, int) or index < 0:
            raise WalkError(f"bad memo index {index!r}")
        if len(self._memo) >= self._max_memo and index not in self._memo:
            raise WalkLimit("pickle.memo", f"more than {self._max_memo} memo entries")
        self._memo[index] = self._top()

    def _memo_get(self, index: Any) -> None:
        value = self._memo.get(index) if isinstance(index, int) else None
        if value is None:
            raise WalkError(f"memo index {index!r} was never stored")
        self.push(value)

    _op_PUT = _op_BINPUT = _op_LONG_BINPUT = _memo_put
    _op_GET = _op_BINGET = _op_LONG_BINGET = _memo_get

    def _op_MEMOIZE(self, arg: Any) -> None:
        self._memo_put(len(self._memo))

    # -- FATE object recognition --------------------------------------------------------------------

    def _recognise(self, obj: Sym) -> None:
        assert obj.cls is not None
        module, name = obj.cls
        if module.startswith("fate_utils.") and name == "PK":
            obj.key = _decode_key(module.split(".", 1)[1], obj.state)
            self.events.append(obj.key)
        elif module.startswith("fate.") and name == "PHETensor":
            keys = _keys_in(obj.state)
            self.events.append(
                EncryptedTensorFound(
                    cls=f"{module}.{name}", key_bits=tuple(k.bits for k in keys), shape=_shape_in(obj.state)
                )
            )


_HANDLERS: Mapping[str, Callable[[SymbolicMachine, Any], None]] = MappingProxyType(
    {name[4:]: fn for name, fn in vars(SymbolicMachine).items() if name.startswith("_op_")}
)
"""Opcode name -> handler; built once from the ``_op_*`` methods (aliases included)."""


def _push_int(machine: SymbolicMachine, arg: Any) -> None:
    machine.push(arg if type(arg) is int else Sym("const"))


def _push_const(machine: SymbolicMachine, arg: Any) -> None:
    machine.push(Sym("const", arg))


def _unhandled(name: str) -> Callable[[SymbolicMachine, Any], None]:
    def fail(machine: SymbolicMachine, arg: Any) -> None:
        raise WalkError(f"unhandled opcode {name}")

    return fail


def handler_for(name: str) -> Callable[[SymbolicMachine, Any], None]:
    """What :meth:`SymbolicMachine.dispatch` does with opcode ``name`` (for callers that resolve it once
    per opcode byte): its ``_op_*`` handler, a push of an int or a constant, or a WalkError."""
    handler = _HANDLERS.get(name)
    if handler is not None:
        return handler
    if name in _INT_OPS:
        return _push_int
    if name in _CONST_OPS:
        return _push_const
    return _unhandled(name)


def _decode_key(scheme: str, state: Any) -> KeyFound:
    if isinstance(state, Sym) and state.kind == "list" and 0 < state.count <= K_MAX_KEY_STATE:
        try:
            raw = bytes(state.items)  # raises unless every item is an int in 0..255
        except (TypeError, ValueError):
            return KeyFound(scheme, 0, "")
        n = decode_bincode_modulus(raw)
        if n is not None:
            digits = format(n, "x").encode()
            return KeyFound(scheme, n.bit_length(), hashlib.sha256(digits).hexdigest()[:16])
    return KeyFound(scheme, 0, "")


def _keys_in(root: Any) -> list[KeyFound]:
    """Keys reachable from ``root`` through containers and object states (bounded search)."""
    found: list[KeyFound] = []
    seen: set[int] = set()
    todo: list[Sym] = [root] if isinstance(root, Sym) else []
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
                if isinstance(sym, Sym) and sym.kind in _COMPOSITE:
                    todo.append(sym)
    return found


def _shape_in(state: Any) -> tuple[int, ...] | None:
    """``_shape`` / ``shape`` from a BUILD state dict: a tuple of ints or ``torch.Size((...))``."""
    if not isinstance(state, Sym) or state.kind != "dict":
        return None
    for key, value in state.items:
        if isinstance(key, Sym) and key.kind == "str" and key.value in ("_shape", "shape"):
            if isinstance(value, Sym) and value.kind == "obj" and value.args is not None and value.args.items:
                value = value.args.items[0]
            if isinstance(value, Sym) and value.kind in ("tuple", "list") and all(type(i) is int for i in value.items):
                return tuple(value.items)
    return None
