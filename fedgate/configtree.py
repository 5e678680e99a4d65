"""Build frozen configuration dataclasses from parsed TOML/JSON, strictly.

Rules of this module:

1. Every config section is a ``@dataclass(frozen=True, slots=True)`` whose fields all have defaults,
   so an empty file is a valid configuration.
2. Unknown keys, wrong types and out-of-range values raise :class:`~fedgate.errors.ConfigError`
   naming the dotted path (``proxy.listen``) and the source file.
3. Field constraints live in the field's metadata: ``field(default=1.0, metadata=bounds(gt=0))``.
   Supported keys: ``ge``, ``gt``, ``le``, ``lt`` (numbers) and ``nonempty`` (strings, tuples).
4. Supported field types: ``bool``, ``int``, ``float`` (ints accepted), ``str``, ``pathlib.Path``,
   ``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``dict[str, X]`` and nested config dataclasses.

Pure: no I/O here; :func:`load_toml` is the one helper that reads a file.
"""

from __future__ import annotations

import dataclasses
import operator
import pathlib
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from fedgate.errors import ConfigError

__all__ = ["bounds", "build", "dump", "load_toml"]

T = TypeVar("T")


def bounds(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    nonempty: bool = False,
) -> dict[str, Any]:
    """Metadata for a dataclass field: numeric bounds and non-emptiness."""
    meta: dict[str, Any] = {}
    for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if value is not None:
            meta[key] = value
    if nonempty:
        meta["nonempty"] = True
    return meta


def load_toml(path: pathlib.Path | str) -> dict[str, Any]:
    """Read a TOML file; a syntax error becomes a ConfigError naming the file and line."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError("file not found", source=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=source) from exc
    except ValueError as exc:  # tomllib raises a bare ValueError for integers beyond the digit limit
        raise ConfigError(f"invalid TOML: {exc}", source=source) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=source) from exc


def build(cls: type[T], data: Any, *, path: str = "", source: str = "") -> T:
    """Build config dataclass ``cls`` from ``data`` (a mapping), validating every key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table, got {_kind(data)}", path=path, source=source)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown}; valid keys: {sorted(fields)}", path=path or "<root>", source=source
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        fpath = f"{path}.{name}" if path else name
        converted = _convert(hints[name], value, fpath, source)
        _check_bounds(fields[name].metadata, converted, fpath, source)
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), path=path or "<root>", source=source) from exc


def dump(obj: Any) -> Any:
    """Turn a config dataclass tree back into plain data (for ``fedgate config show``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: dump(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return obj


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return f"{type(value).__name__} {_show(value)}"[:80]


def _show(value: Any) -> str:
    """``repr`` that cannot fail: huge ints exceed Python's int-to-str digit limit."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<integer of {value.bit_length()} bits>"
    return repr(value)


def _convert(tp: Any, value: Any, path: str, source: str) -> Any:
    origin = get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, source)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError("; ".join(errors), path=path, source=source)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"{_show(value)} is not one of {list(choices)}", path=path, source=source)
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected an array, got {_kind(value)}", path=path, source=source)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"expected {len(args)} items, got {len(value)}", path=path, source=source)
        return tuple(_convert(a, v, f"{path}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a table, got {_kind(value)}", path=path, source=source)
        out = {}
        for k, v in value.items():
            out[_convert(key_tp, k, f"{path}.{k}", source)] = _convert(val_tp, v, f"{path}.{k}", source)
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, path=path, source=source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {_kind(value)}", path=path, source=source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {_kind(value)}", path=path, source=source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {_kind(value)}", path=path, source=source)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError("expected a finite number", path=path, source=source)
        try:
            return float(value)
        except OverflowError as exc:
            raise ConfigError("number too large", path=path, source=source) from exc
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_kind(value)}", path=path, source=source)
        return value
    if tp is pathlib.Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"expected a path string, got {_kind(value)}", path=path, source=source)
        return pathlib.Path(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def _check_bounds(meta: Mapping[str, Any], value: Any, path: str, source: str) -> None:
    if not meta or value is None:
        return
    if meta.get("nonempty") and hasattr(value, "__len__") and len(value) == 0:
        raise ConfigError("must not be empty", path=path, source=source)
    if isinstance(value, int | float) and not isinstance(value, bool):
        for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if key in meta and not _OPS[key](value, meta[key]):
                message = f"{_show(value)} is out of range: must be {sign} {meta[key]}"
                raise ConfigError(message, path=path, source=source)


_OPS: dict[str, Callable[[float, float], bool]] = {
    "ge": operator.ge,
    "gt": operator.gt,
    "le": operator.le,
    "lt": operator.lt,
}
