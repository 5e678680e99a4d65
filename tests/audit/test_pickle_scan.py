"""The opcode walker on hand-built pickles: gadgets, forged keys, chunk boundaries, malformed input."""

from __future__ import annotations

import builtins
import collections
import pathlib
import pickle
import struct
import sys
from typing import Any

import pytest

from fedgate.audit import GlobalImported, KeyFound, Malformed, PickleLimits, PickleWalker, ScanLimit, TensorFound
from fedgate.audit.bench import bincode
from fedgate.audit.events import Event
from fedgate.audit.pickle_scan import decode_bincode_modulus
from tests.audit.conftest import forged_pk_pickle, gadget_pickle


def walk(data: bytes, *, step: int = 0, limits: PickleLimits | None = None) -> list[Event]:
    walker = PickleWalker(limits=limits or PickleLimits())
    if step <= 0:
        walker.feed(data)
    else:
        for i in range(0, len(data), step):
            walker.feed(data[i : i + step])
    walker.close()
    return walker.events()


def safetensors_blob(values: list[list[float]]) -> bytes:
    rows, cols = len(values), len(values[0]) if values else 0
    header = b'{"t":{"dtype":"F64","shape":[%d,%d],"data_offsets":[0,%d]}}' % (rows, cols, rows * cols * 8)
    data = b"".join(struct.pack("<d", v) for row in values for v in row)
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_os_system_gadget_is_reported_and_never_run(protocol: int, canary: pathlib.Path) -> None:
    events = walk(gadget_pickle(f"touch {canary}", protocol))
    calls = [e for e in events if isinstance(e, GlobalImported) and e.called]
    assert [(e.module, e.name) for e in calls] == [("posix", "system")]
    assert not any(isinstance(e, Malformed) for e in events)


def test_gadget_hidden_in_a_memoized_string_is_resolved() -> None:
    # protocol 4 builds the global from two strings; here they come from the memo (BINGET), not inline
    data = (
        b"\x80\x04"
        b"\x8c\x02os\x94\x8c\x06system\x94"  # memo 0 = 'os', memo 1 = 'system'
        b"0"  # POP 'system'
        b"0"  # POP 'os'
        b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL
        b"\x8c\x04true\x85R."  # ('true',) REDUCE STOP
    )
    events = walk(data)
    assert GlobalImported("os", "system", called=True) in events


def test_dynamic_global_is_reported_as_such() -> None:
    data = b"\x80\x04K\x01K\x02\x93."  # STACK_GLOBAL over two ints
    events = walk(data)
    assert GlobalImported("<dynamic>", "<dynamic>") in events


@pytest.mark.parametrize("bits", [128, 1024, 2025, 4096])
def test_forged_key_size_is_read_from_the_bincode_state(bits: int) -> None:
    events = walk(forged_pk_pickle(bits))
    keys = [e for e in events if isinstance(e, KeyFound)]
    assert [(k.scheme, k.bits) for k in keys] == [("paillier", bits)]
    assert len(keys[0].fingerprint) == 16


def test_bincode_modulus_rejects_garbage() -> None:
    assert decode_bincode_modulus(bincode([0xABC])) == 0xABC
    assert decode_bincode_modulus(b"") is None
    assert decode_bincode_modulus((16).to_bytes(4, "little") + (99).to_bytes(8, "little") + b"ab") is None
    assert decode_bincode_modulus((7).to_bytes(4, "little") + (2).to_bytes(8, "little") + b"ab") is None
    assert decode_bincode_modulus((16).to_bytes(4, "little") + (2).to_bytes(8, "little") + b"zz") is None


def test_every_chunk_boundary_gives_the_same_events() -> None:
    obj = {"key": forged_pk_pickle(1024), "t": safetensors_blob([[1.0, 2.0], [3.0, float("nan")]])}
    # the forged key pickle is nested as bytes; walk a pickle that contains the key *object* instead
    data = pickle.dumps([obj["t"], "x" * 300], protocol=4) + b""
    whole = walk(data)
    assert any(isinstance(e, TensorFound) for e in whole)
    for step in (1, 2, 3, 7, 64):
        assert walk(data, step=step) == whole
    key = forged_pk_pickle(2048)
    whole_key = walk(key)
    for step in (1, 5, 13):
        assert walk(key, step=step) == whole_key


def test_large_bytes_are_streamed_not_buffered() -> None:
    rows = [[float(i), float(-i)] for i in range(20_000)]  # 320 kB of tensor data
    blob = safetensors_blob(rows)
    data = pickle.dumps({"bytes": blob}, protocol=4)
    walker = PickleWalker(limits=PickleLimits(inline_arg_bytes=1024))
    peak = 0
    for i in range(0, len(data), 4096):
        walker.feed(data[i : i + 4096])
        peak = max(peak, len(walker._buf))
    walker.close()
    tensors = [e for e in walker.events() if isinstance(e, TensorFound)]
    assert tensors and tensors[0].max == 19_999.0 and tensors[0].min == -19_999.0
    assert peak <= 4096 + 16


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x80\x04K\x01", "truncated"),
        (b"\x80\x04\xff.", "unknown opcode"),
        (b"\x80\x04h\x05.", "never stored"),
        (b"\x80\x04a.", "underflow"),
        (b"\x80\x04K\x01.K", "trailing"),
        (b"\x80\x04e.", "MARK"),
        (b"\x80\x09N.", "protocol"),
    ],
)
def test_malformed_pickles_are_reported(data: bytes, needle: str) -> None:
    events = walk(data)
    bad = [e for e in events if isinstance(e, Malformed)]
    assert bad and needle in bad[0].detail


def test_skip_ignores_a_prefix() -> None:
    data = pickle.dumps({"bytes": safetensors_blob([[1.0, 5.0]])}, protocol=4)
    walker = PickleWalker()
    walker.feed(b"\x00" + data, skip=1)
    walker.close()
    assert walker.done and not walker.failed and walker.consumed == len(data)
    assert walk(data) == walker.events()


def test_bytes_after_stop_in_a_later_piece_are_malformed() -> None:
    walker = PickleWalker()
    walker.feed(b"\x80\x04N.")
    assert walker.done and not walker.failed
    walker.feed(b"N.")
    walker.close()
    events = walker.events()
    assert walker.failed and len(events) == 1 and isinstance(events[0], Malformed) and "trailing" in events[0].detail
    walker.feed(b"more")  # ignored once failed
    assert walker.events() == []


def test_limits_stop_the_walk() -> None:
    data = b"\x80\x04" + b"]\x94" * 100 + b"."
    events = walk(data, limits=PickleLimits(max_memo=10))
    assert any(isinstance(e, ScanLimit) and e.limit == "pickle.memo" for e in events)
    deep = b"\x80\x04" + b"(" * 50 + b"."
    events = walk(deep, limits=PickleLimits(max_stack=20))
    assert any(isinstance(e, ScanLimit) and e.limit == "pickle.stack" for e in events)


def test_ordinary_python_objects_walk_cleanly() -> None:
    value = {
        "a": [1, 2.5, None, True, "s" * 300, b"b" * 70_000],
        "b": (1, 2, 3),
        "c": frozenset({1, 2}),
        "d": collections.OrderedDict(x=1),
        "e": 10**40,
    }
    for protocol in range(6):
        events = walk(pickle.dumps(value, protocol=protocol))
        assert not any(isinstance(e, Malformed | ScanLimit) for e in events), protocol
        assert {e.qualname for e in events if isinstance(e, GlobalImported)} <= {
            "collections.OrderedDict",
            "builtins.frozenset",
            "__builtin__.frozenset",
            "copy_reg._reconstructor",
            "copyreg._reconstructor",
            "builtins.set",
            "__builtin__.set",
            "_codecs.encode",
            "builtins.bytes",
            "__builtin__.bytes",
        }


def test_walker_never_imports_or_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def guarded_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("fedgate_canary"):
            raise AssertionError(f"the walker imported {name}")
        return real_import(name, *args, **kwargs)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the walker must not unpickle")

    monkeypatch.setattr(builtins, "__import__", guarded_import)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    data = b"\x80\x04\x8c\x0efedgate_canary\x8c\x04evil\x93)R."
    events = walk(data)
    assert GlobalImported("fedgate_canary", "evil", called=True) in events
    assert "fedgate_canary" not in sys.modules
