"""Route tables: parse FATE's two JSON formats, look a route up, order its endpoints by health.

Rules of this module:

1. Pure: no I/O, no clock. Text comes in (:func:`parse_route_table`), time comes in as keyword-only
   ``now`` (seconds on any monotonic clock). File reading and reloading live in ``route_reload``.
2. Both FATE formats load unchanged. The format is ``osx`` when the top level has ``self_party``,
   ``rollsite`` otherwise. Keys fedgate does not use (OSX key-store fields, ``negotiationType``...)
   are *warnings* (``RouteTable.warnings``, printed by ``fedgate route check``), never errors, so a
   FATE file loads as it is; a wrong type or value is an error.
3. Every parse error is a :class:`RouteTableError` (a ``ConfigError``) naming the file, the key path
   (``route_table.10000.default[0].port``) and, when the text is known, the line and column.
4. Lookup: the exact party, then party ``default`` when ``default_allow`` is true; inside the matched
   party, the exact role, then role ``default``. ``default_allow`` comes from
   ``permission.default_allow``; when absent it is false in rollsite files (rollsite's rule) and true
   in OSX files (OSX always falls back to ``default``). The role fallback is not gated: rollsite
   tables list every party under role ``default``, which must keep working with default_allow false.
5. Tables are immutable snapshots. :class:`Router` swaps its snapshot in one assignment and keeps
   endpoint health across swaps, keyed by (transport, host, port).
6. Health: healthy endpoints first (weighted random order, weight 0 = standby after the weighted
   ones); a failed endpoint cools down (exponential, capped); once its cool-down ends it is put
   first for one probe per cool-down period; endpoints still cooling come last, soonest first.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

from fedgate.errors import ConfigError, RouteError

__all__ = [
    "K_DEFAULT",
    "Endpoint",
    "EndpointStatistics",
    "Route",
    "RouteTable",
    "RouteTableError",
    "Router",
    "RouterStatistics",
    "TableDiff",
    "Transport",
    "diff_tables",
    "parse_route_data",
    "parse_route_table",
]

Transport = Literal["grpc", "tcp", "quic", "rdma", "auto"]
Protocol = Literal["grpc", "http"]

K_DEFAULT = "default"  # the fallback party / role key of both FATE formats
K_MAX_WEIGHT = 1_000_000  # largest per-endpoint weight (dimensionless)
K_COOLDOWN_INITIAL = 1.0  # seconds an endpoint cools down after its first failure
K_COOLDOWN_MAX = 60.0  # seconds, the cap of the exponential cool-down
K_MAX_REASON = 200  # characters of a failure reason kept in statistics
K_MAX_WARNINGS = 50  # warnings kept per table; the rest are counted

_TRANSPORTS: tuple[str, ...] = get_args(Transport)
_PROTOCOLS: tuple[str, ...] = get_args(Protocol)
# Endpoint keys fedgate reads; every other key is ignored with a warning.
_ENDPOINT_KEYS = frozenset(
    {
        "ip",
        "port",
        "is_secure",
        "is_polling",
        "protocol",
        "url",
        "useSSL",
        "caFile",
        "certChainFile",
        "privateKeyFile",
        "transport",
        "weight",
        "datacenter",
    }
)
_TOP_KEYS = frozenset({"route_table", "permission", "self_party"})
_JSON_WS = re.compile(r"[ \t\n\r]*")

Segment = str | int


class RouteTableError(ConfigError):
    """A route table file is invalid; ``line`` and ``column`` are 1-based, 0 when unknown."""

    def __init__(
        self, message: str, *, path: str = "", source: str = "", line: int = 0, column: int = 0
    ) -> None:
        self.line = line
        self.column = column
        if line:
            message = f"{message} (line {line}, column {column})"
        super().__init__(message, path=path, source=source)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One next hop of a route: a peer gateway, a FATE proxy or a local FATE service."""

    host: str
    """Host name or IP address (``ip`` in both FATE formats, or the host of ``url``)."""
    port: int
    """TCP/UDP port, 1..65535."""
    transport: Transport = "grpc"
    """fedgate extension: ``grpc`` is the FATE-compatible hop (OSX/rollsite protocols); ``tcp``, ``quic``,
    ``rdma`` are fedgate links; ``auto`` lets the link layer pick (RDMA inside one datacenter)."""
    use_tls: bool = False
    """TLS towards this hop (rollsite ``is_secure``, OSX ``useSSL``)."""
    ca_file: pathlib.Path | None = None
    """OSX ``caFile``: CA bundle that verifies the hop."""
    cert_file: pathlib.Path | None = None
    """OSX ``certChainFile``: our client certificate chain for this hop."""
    key_file: pathlib.Path | None = None
    """OSX ``privateKeyFile``: the key of ``cert_file``."""
    weight: int = 1
    """fedgate extension: relative share of traffic among healthy endpoints; 0 means standby."""
    datacenter: str = ""
    """fedgate extension: datacenter label (``auto`` picks RDMA when it matches ours)."""
    is_polling: bool = False
    """rollsite ``is_polling``: the peer polls us instead of accepting connections."""
    protocol: Protocol = "grpc"
    """OSX ``protocol`` of the compatible hop: ``grpc`` or ``http``."""
    url: str | None = None
    """OSX ``url`` of an ``http`` hop."""

    @property
    def key(self) -> tuple[str, str, int]:
        """Identity for health tracking: (transport, host, port)."""
        return (self.transport, self.host, self.port)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"

    def describe(self) -> str:
        """``quic://10.0.0.2:9371 tls weight=1 dc=a`` for logs and ``route show``."""
        parts = [self.address, "tls" if self.use_tls else "plaintext", f"weight={self.weight}"]
        if self.datacenter:
            parts.append(f"dc={self.datacenter}")
        if self.protocol != "grpc" or self.url:
            parts.append(f"protocol={self.protocol}" + (f" url={self.url}" if self.url else ""))
        if self.ca_file:
            parts.append(f"ca={self.ca_file}")
        if self.cert_file:
            parts.append(f"cert={self.cert_file} key={self.key_file}")
        if self.is_polling:
            parts.append("polling")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Route:
    """The answer to a lookup: endpoints in the order to try them."""

    party: str
    role: str
    endpoints: tuple[Endpoint, ...]
    matched_party: str
    """The table key that matched: ``party`` itself or ``default``."""
    matched_role: str
    """The role key that matched: ``role`` itself or ``default``."""

    @property
    def primary(self) -> Endpoint:
        return self.endpoints[0]


@dataclass(frozen=True, slots=True)
class RouteTable:
    """An immutable route table snapshot. Not hashable (``entries`` is a mapping)."""

    self_parties: tuple[str, ...]
    """OSX ``self_party``: parties stored locally (rollsite files have none)."""
    entries: Mapping[str, Mapping[str, tuple[Endpoint, ...]]]
    """party -> role -> endpoints, in file order."""
    default_allow: bool
    """Whether a party missing from the table falls back to party ``default``."""
    source: str = ""
    """File the table came from, for errors and logs."""
    format: Literal["rollsite", "osx"] = "rollsite"
    warnings: tuple[str, ...] = ()
    """Ignored keys and suspicious settings; the table is usable."""

    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every distinct endpoint (by key), in file order."""
        seen: dict[tuple[str, str, int], Endpoint] = {}
        for roles in self.entries.values():
            for endpoints in roles.values():
                for ep in endpoints:
                    seen.setdefault(ep.key, ep)
        return tuple(seen.values())

    def is_local(self, party: str, gateway_party_ids: Iterable[str]) -> bool:
        """True when messages to ``party`` are stored here: one of ours or listed in ``self_party``."""
        return party in self.self_parties or party in set(gateway_party_ids)

    def lookup(self, party: str, role: str) -> Route:
        """The route in file order (no health); RouteError names party, role and the table file."""
        route, steps = self.explain(party, role)
        if route is None:
            raise RouteError(
                f"no route to party {party!r} role {role!r} in {self.source or '<table>'}: {steps[-1]}"
            )
        return route

    def explain(self, party: str, role: str) -> tuple[Route | None, list[str]]:
        """The lookup step by step: (route or None, human-readable steps)."""
        steps: list[str] = []
        roles = self.entries.get(party)
        matched_party = party
        if roles is not None:
            steps.append(f"party {party!r}: found")
        elif K_DEFAULT in self.entries and self.default_allow:
            steps.append(
                f"party {party!r}: not in the table; falling back to party 'default' (default_allow)"
            )
            roles, matched_party = self.entries[K_DEFAULT], K_DEFAULT
        else:
            why = (
                "default_allow is false" if K_DEFAULT in self.entries else "the table has no 'default' party"
            )
            steps.append(f"party {party!r}: not in the table and no fallback ({why})")
            return None, steps
        role = role or K_DEFAULT
        if role in roles:
            steps.append(f"role {role!r}: found under party {matched_party!r}")
            matched_role = role
        elif K_DEFAULT in roles:
            steps.append(f"role {role!r}: not under party {matched_party!r}; falling back to role 'default'")
            matched_role = K_DEFAULT
        else:
            steps.append(
                f"role {role!r}: not under party {matched_party!r}, which has no 'default' role "
                f"(roles: {', '.join(sorted(roles))})"
            )
            return None, steps
        return Route(party, role, roles[matched_role], matched_party, matched_role), steps


# ----------------------------------------------------------------------------------------------- parsing


def parse_route_table(data: bytes | str, *, source: str = "") -> RouteTable:
    """Parse a route table file's content (UTF-8, BOM allowed); errors are RouteTableError."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RouteTableError(f"not UTF-8 text (byte {exc.start})", source=source) from exc
    else:
        text = data.removeprefix("\ufeff")
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    duplicates.append(key)
                seen.add(key)
        return out

    try:
        obj = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise RouteTableError(
            f"invalid JSON: {exc.msg}", source=source, line=exc.lineno, column=exc.colno
        ) from exc
    except RecursionError as exc:
        raise RouteTableError("invalid JSON: nested too deeply", source=source) from exc
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise RouteTableError(f"invalid JSON: {exc}"[:200], source=source) from exc
    warnings = [f"duplicate key {k!r}: the last one wins" for k in dict.fromkeys(duplicates)]
    try:
        return _Parser(source, warnings).table(obj)
    except _KeyPathError as exc:
        line, column = _locate(text, exc.segments)
        raise RouteTableError(
            exc.message, path=_format_path(exc.segments), source=source, line=line, column=column
        ) from None


def parse_route_data(obj: object, *, source: str = "") -> RouteTable:
    """Build a table from already parsed JSON (either format); errors are RouteTableError."""
    try:
        return _Parser(source, []).table(obj)
    except _KeyPathError as exc:
        raise RouteTableError(exc.message, path=_format_path(exc.segments), source=source) from None


class _KeyPathError(Exception):
    def __init__(self, message: str, segments: Sequence[Segment]) -> None:
        super().__init__(message)
        self.message = message
        self.segments = tuple(segments)


class _Parser:
    def __init__(self, source: str, warnings: list[str]) -> None:
        self.source = source
        self.warnings = warnings

    def warn(self, segments: Sequence[Segment], text: str) -> None:
        self.warnings.append(f"{_format_path(segments) or '<root>'}: {text}")

    def table(self, obj: object) -> RouteTable:
        top = _expect_object(obj, ())
        for key in top:
            if key not in _TOP_KEYS:
                self.warn((key,), "unknown top-level key, ignored")
        fmt: Literal["rollsite", "osx"] = "osx" if "self_party" in top else "rollsite"
        self_parties: tuple[str, ...] = ()
        if fmt == "osx":
            raw = top["self_party"]
            if not isinstance(raw, list):
                raise _KeyPathError(f"expected an array of party ids, got {_kind(raw)}", ("self_party",))
            self_parties = tuple(_party_id(v, ("self_party", i)) for i, v in enumerate(raw))
        default_allow = fmt == "osx"
        if "permission" in top:
            perm = _expect_object(top["permission"], ("permission",))
            for key in perm:
                if key != "default_allow":
                    self.warn(("permission", key), "unknown key, ignored")
            if "default_allow" in perm:
                default_allow = _expect_bool(perm["default_allow"], ("permission", "default_allow"))
        if "route_table" not in top:
            raise _KeyPathError("missing key 'route_table'", ())
        parties = _expect_object(top["route_table"], ("route_table",))
        entries: dict[str, Mapping[str, tuple[Endpoint, ...]]] = {}
        for party, roles_obj in parties.items():
            ppath: tuple[Segment, ...] = ("route_table", party)
            if not party:
                raise _KeyPathError("empty party id", ppath)
            roles = _expect_object(roles_obj, ppath)
            if not roles:
                raise _KeyPathError("party has no roles", ppath)
            by_role: dict[str, tuple[Endpoint, ...]] = {}
            for role, eps in roles.items():
                rpath = (*ppath, role)
                if not role:
                    raise _KeyPathError("empty role name", rpath)
                if not isinstance(eps, list):
                    raise _KeyPathError(f"expected an array of endpoints, got {_kind(eps)}", rpath)
                if not eps:
                    raise _KeyPathError("no endpoints", rpath)
                by_role[role] = tuple(self.endpoint(ep, (*rpath, i)) for i, ep in enumerate(eps))
            entries[party] = MappingProxyType(by_role)
        if K_DEFAULT in entries and not default_allow:
            self.warn(("route_table", K_DEFAULT), "party 'default' is never used: default_allow is false")
        warnings = self.warnings[:K_MAX_WARNINGS]
        if len(self.warnings) > K_MAX_WARNINGS:
            warnings.append(f"... and {len(self.warnings) - K_MAX_WARNINGS} more warnings")
        return RouteTable(
            self_parties, MappingProxyType(entries), default_allow, self.source, fmt, tuple(warnings)
        )

    def endpoint(self, obj: object, path: tuple[Segment, ...]) -> Endpoint:
        ep = _expect_object(obj, path)
        for key in ep:
            if key not in _ENDPOINT_KEYS:
                self.warn((*path, key), "not used by fedgate, ignored")

        def get(key: str, kind: type, default: Any) -> Any:
            if key not in ep or ep[key] is None:
                return default
            value = ep[key]
            if kind is bool:
                return _expect_bool(value, (*path, key))
            if not isinstance(value, str):
                raise _KeyPathError(f"expected a string, got {_kind(value)}", (*path, key))
            return value

        protocol = get("protocol", str, "grpc")
        if protocol not in _PROTOCOLS:
            raise _KeyPathError(f"{protocol[:40]!r} is not one of {list(_PROTOCOLS)}", (*path, "protocol"))
        transport = get("transport", str, "grpc")
        if transport not in _TRANSPORTS:
            raise _KeyPathError(f"{transport[:40]!r} is not one of {list(_TRANSPORTS)}", (*path, "transport"))
        if protocol == "http" and transport != "grpc":
            raise _KeyPathError(
                "protocol 'http' is the OSX HTTP hop; it needs transport 'grpc'", (*path, "transport")
            )
        url = get("url", str, None) or None
        host, port = self.host_port(ep, url, path)
        secure = [get(k, bool, None) for k in ("is_secure", "useSSL")]
        if None not in secure and secure[0] != secure[1]:
            raise _KeyPathError("is_secure and useSSL disagree", (*path, "useSSL"))
        use_tls = bool(secure[0] or secure[1])
        files = {k: get(k, str, None) for k in ("caFile", "certChainFile", "privateKeyFile")}
        for key, value in files.items():
            if value == "":
                files[key] = None
        if (files["certChainFile"] is None) != (files["privateKeyFile"] is None):
            raise _KeyPathError("certChainFile and privateKeyFile must be set together", path)
        if not use_tls and any(files.values()):
            self.warn(path, "TLS files are given but useSSL/is_secure is not true: the hop is plaintext")
        if use_tls and transport == "rdma":
            self.warn(path, "RDMA has no TLS: use_tls applies only to the connection set-up")
        weight = 1 if ep.get("weight") is None else ep["weight"]
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= K_MAX_WEIGHT:
            raise _KeyPathError(
                f"expected an integer 0..{K_MAX_WEIGHT}, got {_kind(weight)}", (*path, "weight")
            )
        return Endpoint(
            host=host,
            port=port,
            transport=transport,
            use_tls=use_tls,
            ca_file=_path(files["caFile"]),
            cert_file=_path(files["certChainFile"]),
            key_file=_path(files["privateKeyFile"]),
            weight=weight,
            datacenter=get("datacenter", str, ""),
            is_polling=get("is_polling", bool, False),
            protocol=protocol,
            url=url,
        )

    def host_port(self, ep: Mapping[str, Any], url: str | None, path: tuple[Segment, ...]) -> tuple[str, int]:
        host, port = ep.get("ip"), ep.get("port")
        if (host is None or port is None) and url:
            try:
                split = urllib.parse.urlsplit(url)
                url_port = split.port
            except ValueError as exc:
                raise _KeyPathError(f"invalid url: {exc}", (*path, "url")) from None
            if split.scheme not in ("http", "https") or not split.hostname:
                raise _KeyPathError("expected an http(s) URL with a host", (*path, "url"))
            host = split.hostname if host is None else host
            port = (url_port or (443 if split.scheme == "https" else 80)) if port is None else port
        if host is None or port is None:
            missing = "ip" if host is None else "port"
            raise _KeyPathError(f"missing key {missing!r} (needed unless url gives it)", path)
        if not isinstance(host, str) or not host or any(c.isspace() for c in host):
            raise _KeyPathError(f"expected a host name or address, got {_kind(host)}", (*path, "ip"))
        if isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5:
            port = int(port)  # FATE's Java loaders accept "9370" as well as 9370
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise _KeyPathError(f"expected a port 1..65535, got {_kind(port)}", (*path, "port"))
        return host, port


def _expect_object(obj: object, path: Sequence[Segment]) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise _KeyPathError(f"expected an object, got {_kind(obj)}", path)
    return obj


def _expect_bool(value: object, path: Sequence[Segment]) -> bool:
    if not isinstance(value, bool):
        raise _KeyPathError(f"expected true or false, got {_kind(value)}", path)
    return value


def _party_id(value: object, path: Sequence[Segment]) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "" or _huge(value):
        raise _KeyPathError(f"expected a party id, got {_kind(value)}", path)
    return str(value)


def _huge(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30


def _path(value: str | None) -> pathlib.Path | None:
    return pathlib.Path(value) if value else None


def _kind(value: object) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    if value is None:
        return "null"
    if _huge(value):
        return "a huge integer"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _format_path(segments: Sequence[Segment]) -> str:
    out = ""
    for seg in segments:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else seg)
    return out


def _skip_ws(text: str, pos: int) -> int:
    match = _JSON_WS.match(text, pos)
    return match.end() if match else pos


def _scanstring(text: str, pos: int) -> tuple[str, int]:
    """Decode the JSON string whose body starts at ``pos`` (after the quote); returns (value, end)."""
    value, end = json.JSONDecoder().raw_decode(text, pos - 1)
    return str(value), end


def _locate(text: str, segments: Sequence[Segment]) -> tuple[int, int]:
    """Line and column of the deepest value on ``segments`` that exists in ``text`` ((0, 0) if none)."""
    decoder = json.JSONDecoder()
    try:
        pos = found = _skip_ws(text, 0)
        for seg in segments:
            target = None
            opener, closer = ("{", "}") if isinstance(seg, str) else ("[", "]")
            if text[pos] != opener:
                break
            pos = _skip_ws(text, pos + 1)
            index = 0
            while text[pos] != closer:
                if isinstance(seg, str):
                    key, pos = _scanstring(text, pos + 1)
                    pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past the ':'

                    target = pos if key == seg else target  # the last duplicate wins, as in json.loads
                else:
                    target = pos if index == seg else target
                    index += 1
                _, pos = decoder.raw_decode(text, pos)
                pos = _skip_ws(text, pos)
                if text[pos] == ",":
                    pos = _skip_ws(text, pos + 1)
            if target is None:
                break
            pos = found = target
    except (ValueError, IndexError, RecursionError):
        return (0, 0)
    line = text.count("\n", 0, found) + 1
    return line, found - (text.rfind("\n", 0, found) + 1) + 1


# ------------------------------------------------------------------------------------------------ diffs


@dataclass(frozen=True, slots=True)
class TableDiff:
    """What changed between two tables, by (party, role)."""

    added: tuple[tuple[str, str], ...]
    removed: tuple[tuple[str, str], ...]
    changed: tuple[tuple[str, str], ...]
    settings_changed: tuple[str, ...]
    """Top-level settings that differ: ``format``, ``default_allow``, ``self_party``."""

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.settings_changed)

    def summary(self) -> str:
        """One line: ``+1 -0 ~2 routes; default_allow changed``."""

        def names(keys: tuple[tuple[str, str], ...]) -> str:
            shown = ", ".join(f"{p}/{r}" for p, r in keys[:5])
            return f" ({shown}{', ...' if len(keys) > 5 else ''})" if keys else ""

        text = (
            f"+{len(self.added)}{names(self.added)} -{len(self.removed)}{names(self.removed)} "
            f"~{len(self.changed)}{names(self.changed)} routes"
        )
        if self.settings_changed:
            text += f"; {', '.join(self.settings_changed)} changed"
        return text


def diff_tables(old: RouteTable, new: RouteTable) -> TableDiff:
    def flat(table: RouteTable) -> dict[tuple[str, str], tuple[Endpoint, ...]]:
        return {(p, r): eps for p, roles in table.entries.items() for r, eps in roles.items()}

    before, after = flat(old), flat(new)
    settings = tuple(
        name
        for name, a, b in (
            ("format", old.format, new.format),
            ("default_allow", old.default_allow, new.default_allow),
            ("self_party", old.self_parties, new.self_parties),
        )
        if a != b
    )
    return TableDiff(
        added=tuple(k for k in after if k not in before),
        removed=tuple(k for k in before if k not in after),
        changed=tuple(k for k in after if k in before and before[k] != after[k]),
        settings_changed=settings,
    )


# ----------------------------------------------------------------------------------------------- router


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    """Health of one endpoint, as a frozen snapshot."""

    address: str
    healthy: bool
    """False from a failure until the next success."""
    failures: int
    """Consecutive failures since the last success."""
    total_failures: int
    successes: int
    last_error: str
    next_retry: float | None
    """When the cool-down ends (same clock as ``now``); None when healthy."""


@dataclass(frozen=True, slots=True)
class RouterStatistics:
    source: str
    endpoints: tuple[EndpointStatistics, ...]


@dataclass(slots=True)
class _Health:
    failures: int = 0
    total_failures: int = 0
    successes: int = 0
    last_error: str = ""
    next_retry: float = 0.0


class Router:
    """Health-aware routing over a table snapshot that :meth:`swap` replaces atomically.

    Pure: time is the ``now`` argument; randomness comes from ``rng`` (seed it in tests).
    """

    def __init__(
        self,
        table: RouteTable,
        *,
        rng: random.Random | None = None,
        cooldown_initial_s: float = K_COOLDOWN_INITIAL,
        cooldown_max_s: float = K_COOLDOWN_MAX,
    ) -> None:
        if not 0 < cooldown_initial_s <= cooldown_max_s:
            raise ValueError("need 0 < cooldown_initial_s <= cooldown_max_s")
        self._rng = rng or random.Random()
        self._cooldown_initial = cooldown_initial_s
        self._cooldown_max = cooldown_max_s
        self._table = table
        self._health: dict[tuple[str, str, int], _Health] = {ep.key: _Health() for ep in table.endpoints()}

    @property
    def table(self) -> RouteTable:
        return self._table

    def is_local(self, party: str, gateway_party_ids: Iterable[str] = ()) -> bool:
        """See :meth:`RouteTable.is_local` (on the current snapshot)."""
        return self._table.is_local(party, gateway_party_ids)

    def swap(self, table: RouteTable) -> TableDiff:
        """Install ``table``; health carries over for endpoints that remain. Returns the diff."""
        diff = diff_tables(self._table, table)
        self._health = {ep.key: self._health.get(ep.key) or _Health() for ep in table.endpoints()}
        self._table = table
        return diff

    def route(self, party: str, role: str, *, now: float) -> Route:
        """The route to ``party``/``role`` with endpoints in the order to try them."""
        route = self._table.lookup(party, role)
        if len(route.endpoints) == 1:
            return route
        healthy: list[tuple[float, Endpoint]] = []
        due: list[Endpoint] = []
        cooling: list[tuple[float, Endpoint]] = []
        for ep in route.endpoints:
            h = self._health.setdefault(ep.key, _Health())
            if h.failures == 0:
                # Efraimidis-Spirakis: sorting by u ** (1 / w) gives a weighted random order.
                u = self._rng.random()
                healthy.append((u ** (1.0 / ep.weight) if ep.weight else u - 1.0, ep))
            elif now >= h.next_retry:
                due.append(ep)
            else:
                cooling.append((h.next_retry, ep))
        ordered: list[Endpoint] = []
        if due:
            probe = due.pop(0)
            # one probe per cool-down period: the lease keeps other calls off it until it reports
            h = self._health[probe.key]
            h.next_retry = now + self._cooldown(h.failures)
            ordered.append(probe)
            cooling.extend((self._health[ep.key].next_retry, ep) for ep in due)
        healthy.sort(key=lambda item: item[0], reverse=True)
        cooling.sort(key=lambda item: item[0])
        ordered += [ep for _, ep in healthy] + [ep for _, ep in cooling]
        return Route(route.party, route.role, tuple(ordered), route.matched_party, route.matched_role)

    def report_success(self, endpoint: Endpoint, *, now: float) -> None:
        h = self._health.get(endpoint.key)
        if h is None:
            return  # removed by a reload
        h.successes += 1
        h.failures = 0
        h.next_retry = now

    def report_failure(self, endpoint: Endpoint, *, now: float, reason: str) -> None:
        h = self._health.get(endpoint.key)
        if h is None:
            return
        h.failures += 1
        h.total_failures += 1
        h.last_error = reason[:K_MAX_REASON]
        h.next_retry = now + self._cooldown(h.failures)

    def statistics(self) -> RouterStatistics:
        by_key = {ep.key: ep for ep in self._table.endpoints()}
        return RouterStatistics(
            self._table.source,
            tuple(
                EndpointStatistics(
                    address=by_key[key].address,
                    healthy=h.failures == 0,
                    failures=h.failures,
                    total_failures=h.total_failures,
                    successes=h.successes,
                    last_error=h.last_error,
                    next_retry=None if h.failures == 0 else h.next_retry,
                )
                # list(): the metrics thread may call this while the loop thread adds entries
                for key, h in list(self._health.items())
                if key in by_key
            ),
        )

    def _cooldown(self, failures: int) -> float:
        return min(self._cooldown_max, self._cooldown_initial * math.ldexp(1.0, min(failures - 1, 60)))
