"""The incremental safetensors scanner: dtypes, per-feature statistics, any split, bad headers."""

from __future__ import annotations

import json
import struct

import numpy as np
import numpy.typing as npt
import pytest

from fedgate.audit import Malformed, SafetensorsScanner, TensorFound
from fedgate.audit.events import Event
from fedgate.audit.safetensors_scan import looks_like_safetensors

_CODES = {"float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64", "int8": "I8", "bool": "BOOL"}


def blob(arr: npt.NDArray[np.generic], *, dtype: str | None = None, name: str = "t") -> bytes:
    data = np.ascontiguousarray(arr).tobytes()
    code = dtype or _CODES[str(arr.dtype)]
    header = json.dumps({name: {"dtype": code, "shape": list(arr.shape), "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def scan(data: bytes, step: int = 0) -> list[Event]:
    scanner = SafetensorsScanner(len(data))
    if step <= 0:
        scanner.feed(data)
    else:
        for i in range(0, len(data), step):
            scanner.feed(data[i : i + step])
    return scanner.finish()


def one(events: list[Event]) -> TensorFound:
    assert len(events) == 1 and isinstance(events[0], TensorFound), events
    return events[0]


def test_per_feature_statistics() -> None:
    arr = np.array([[1.0, -2.0, np.nan], [3.0, np.inf, 0.5], [-4.0, 7.0, np.nan]], dtype=np.float32)
    t = one(scan(blob(arr)))
    assert (t.dtype, t.shape, t.nan, t.posinf, t.neginf) == ("F32", (3, 3), 2, 1, 0)
    assert (t.min, t.max) == (-4.0, 7.0)
    assert [(c.min, c.max, c.nan, c.posinf) for c in t.columns] == [
        (-4.0, 3.0, 0, 0),
        (-2.0, 7.0, 0, 1),
        (0.5, 0.5, 2, 0),
    ]


@pytest.mark.parametrize("step", [1, 3, 8, 13, 100])
def test_any_split_gives_the_same_result(step: int) -> None:
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(50, 7))
    arr[17, 3] = np.nan
    data = blob(arr)
    assert scan(data, step) == scan(data)


@pytest.mark.parametrize("dtype", ["float16", "float64", "int64", "int8", "bool"])
def test_dtypes(dtype: str) -> None:
    arr = np.array([[0, 1], [1, 0], [1, 1]]).astype(dtype)
    t = one(scan(blob(arr)))
    assert (t.min, t.max, t.nan) == (0.0, 1.0, 0)
    assert [c.max for c in t.columns] == [1.0, 1.0]


def test_bfloat16_is_widened() -> None:
    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    t = one(scan(blob(bf16, dtype="BF16")))
    assert (t.min, t.max, t.shape) == (-2.0, 3.25, (3,))


def test_empty_tensors() -> None:
    for shape in [(16, 0), (0, 4)]:
        t = one(scan(blob(np.zeros(shape, dtype=np.float64))))
        assert t.empty and t.columns == () and t.min is None


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
        b'{"t": {"dtype": "X99", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
        b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
        b"[1, 2]",
    ],
)
def test_bad_headers_are_malformed(header: bytes) -> None:
    data = struct.pack("<Q", len(header)) + header + b"\0" * 4
    events = scan(data)
    assert len(events) == 1 and isinstance(events[0], Malformed)


def test_truncated_blob_is_malformed() -> None:
    data = blob(np.ones((4, 4)))
    scanner = SafetensorsScanner(len(data))
    scanner.feed(data[:-5])
    events = scanner.finish()
    assert len(events) == 1 and isinstance(events[0], Malformed) and "ended after" in events[0].detail


def test_sniffing() -> None:
    data = blob(np.ones((2, 2)))
    assert looks_like_safetensors(data[:10], len(data))
    assert not looks_like_safetensors(b"\x80\x04" + b"\0" * 8, 100)
    assert not looks_like_safetensors(data[:10], 12)
