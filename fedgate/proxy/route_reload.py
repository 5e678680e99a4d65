"""The route table's asyncio adapter: load, watch, reload atomically; and ``fedgate route`` (CLI).

Rules of this module:

1. The only place that reads the route table file. Parsing and routing stay in the pure
   :mod:`fedgate.proxy.routing`; this module adds the file system, the clock and the metrics.
2. Change detection: the file's (device, inode, size, mtime) is polled every ``poll_interval_s``;
   a change (an in-place edit, an atomic rename, a new file) triggers a reload. Content read within
   ``K_RACY_S`` of its mtime is re-read on the next poll and compared by content, so a second write in
   the same timestamp tick is not missed. :meth:`RouteReloader.reload` forces a reload (SIGHUP).
3. Atomic: the new table replaces the old one in a single :meth:`Router.swap`; a bad or missing file
   keeps the old table, logs why (path, line, key) once per change and counts it in
   ``fedgate_route_table_reloads_total{result="error"}``; ``fedgate_route_table_stale`` is 1 meanwhile.
4. A bad file at start-up is a ConfigError: the gateway refuses to start.
5. The file is small (kilobytes): it is read synchronously on the loop thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import pathlib
import sys
import time
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from typing import TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedgate.config import RoutesConfig
from fedgate.errors import ConfigError, RouteError
from fedgate.proxy.routing import Router, RouteTable, RouteTableError, parse_route_table

__all__ = ["RouteReloader", "RouterCollector", "load_route_table", "main_route", "read_route_table"]

K_RACY_S = 2.0  # seconds: content whose mtime is this recent is re-checked by content on the next poll

Signature = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def read_route_table(path: pathlib.Path) -> tuple[RouteTable, Signature, bytes]:
    """Read and parse ``path``; returns the table, the signature of what was read and the raw bytes."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
    except FileNotFoundError as exc:
        raise RouteTableError("file not found", source=source) from exc
    except OSError as exc:
        raise RouteTableError(f"cannot read: {exc.strerror or exc}", source=source) from exc
    return parse_route_table(data, source=source), _signature(st), data


def load_route_table(path: pathlib.Path | str) -> RouteTable:
    """Read and parse a route table file; every problem is a RouteTableError naming the file."""
    return read_route_table(pathlib.Path(path))[0]


def _signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class RouteReloader:
    """Owns the :class:`Router` of one gateway and keeps its table in step with the file."""

    def __init__(
        self,
        config: RoutesConfig,
        *,
        registry: CollectorRegistry,
        logger: logging.Logger | None = None,
    ) -> None:
        self._path = config.file
        self._interval = config.poll_interval_s
        self._log = logger or logging.getLogger("fedgate.routes")
        self._router: Router | None = None
        self._signature: Signature | None = None
        self._digest = b""
        self._racy = False
        self._stale = False
        self.reloads = Counter(
            "fedgate_route_table_reloads",
            "Route table (re)loads, by result (ok, error)",
            ["result"],
            registry=registry,
        )
        self.stale = Gauge(
            "fedgate_route_table_stale",
            "1 while the route table file is bad and the previous table serves",
            registry=registry,
        )
        self.last_success = Gauge(
            "fedgate_route_table_last_success_timestamp_seconds",
            "Unix time of the last successful (re)load",
            registry=registry,
        )
        self.routes = Gauge(
            "fedgate_route_table_routes", "(party, role) entries in the route table", registry=registry
        )
        self.endpoints = Gauge(
            "fedgate_route_table_endpoints", "Distinct endpoints in the route table", registry=registry
        )
        registry.register(RouterCollector(self))

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def router(self) -> Router:
        if self._router is None:
            raise RuntimeError("call load_initial() first")
        return self._router

    @property
    def loaded(self) -> bool:
        return self._router is not None

    def load_initial(self) -> RouteTable:
        """First load; a bad file raises (the gateway must not start on it)."""
        table, signature, data = read_route_table(self._path)
        self._router = Router(table)
        self._installed(table, signature, data)
        for warning in table.warnings:
            self._log.warning("route table: %s", warning, extra={"fields": {"path": str(self._path)}})
        self._log.info("route table loaded", extra={"fields": self._describe(table)})
        return table

    def reload(self) -> bool:
        """Re-read the file now (SIGHUP); True if its table is installed, False if the old one is kept."""
        try:
            table, signature, data = read_route_table(self._path)
        except RouteTableError as exc:
            self._signature, self._racy = self._stat(), False  # the poller need not report it again
            self._failed(exc)
            return False
        self._install(table, signature, data)
        return True

    def poll(self) -> bool | None:
        """Check the file once: None if unchanged, else the result of the reload."""
        signature = self._stat()
        if signature == self._signature and not self._racy:
            return None
        if signature is None:
            self._signature, self._racy = None, False
            self._failed(RouteTableError("file not found", source=str(self._path)))
            return False
        try:
            table, signature, data = read_route_table(self._path)
        except RouteTableError as exc:
            self._signature = signature  # report a bad file once, not at every poll
            self._racy = False
            self._failed(exc)
            return False
        if hashlib.sha256(data).digest() == self._digest and not self._stale:
            self._signature, self._racy = signature, self._is_racy(signature)
            return None  # touched, not changed
        self._install(table, signature, data)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set."""
        if self._router is None:
            self.load_initial()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
                return
            self.poll()

    # -- internals -----------------------------------------------------------------------------

    def _install(self, table: RouteTable, signature: Signature, data: bytes) -> None:
        router = self.router
        diff = router.swap(table)
        self._installed(table, signature, data)
        for warning in table.warnings:
            self._log.warning("route table: %s", warning, extra={"fields": {"path": str(self._path)}})
        fields = self._describe(table)
        self._log.info(f"route table reloaded: {diff.summary()}", extra={"fields": fields})

    def _installed(self, table: RouteTable, signature: Signature, data: bytes) -> None:
        self._signature = signature
        self._digest = hashlib.sha256(data).digest()
        self._racy = self._is_racy(signature)
        self.reloads.labels("ok").inc()
        self._stale = False
        self.stale.set(0)
        self.last_success.set(time.time())
        self.routes.set(sum(len(roles) for roles in table.entries.values()))
        self.endpoints.set(len(table.endpoints()))

    def _failed(self, exc: RouteTableError) -> None:
        self.reloads.labels("error").inc()
        self._stale = True
        self.stale.set(1)
        self._log.error(
            "route table reload failed; keeping the previous table",
            extra={
                "fields": {"path": str(self._path), "line": exc.line, "key": exc.path, "error": exc.message}
            },
        )

    def _stat(self) -> Signature | None:
        try:
            return _signature(os.stat(self._path))
        except OSError:
            return None

    def _is_racy(self, signature: Signature) -> bool:
        return time.time() - signature[3] / 1e9 < K_RACY_S

    def _describe(self, table: RouteTable) -> dict[str, object]:
        return {
            "path": str(self._path),
            "format": table.format,
            "parties": len(table.entries),
            "endpoints": len(table.endpoints()),
            "default_allow": table.default_allow,
            "warnings": len(table.warnings),
        }


class RouterCollector(Collector):
    """Per-endpoint health of the current table, read from :meth:`Router.statistics` at scrape time."""

    def __init__(self, reloader: RouteReloader) -> None:
        self._reloader = reloader

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "fedgate_route_endpoint_healthy",
            "1 when the endpoint's last attempt succeeded",
            labels=["endpoint"],
        )
        failures = CounterMetricFamily(
            "fedgate_route_endpoint_failures", "Failed attempts towards the endpoint", labels=["endpoint"]
        )
        successes = CounterMetricFamily(
            "fedgate_route_endpoint_successes",
            "Successful attempts towards the endpoint",
            labels=["endpoint"],
        )
        if self._reloader.loaded:
            for stats in self._reloader.router.statistics().endpoints:
                healthy.add_metric([stats.address], 1.0 if stats.healthy else 0.0)
                failures.add_metric([stats.address], stats.total_failures)
                successes.add_metric([stats.address], stats.successes)
        yield from (healthy, failures, successes)


# ---------------------------------------------------------------------------------------------- the CLI


def main_route(argv: Sequence[str], *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``fedgate route check FILE`` and ``fedgate route show FILE PARTY [ROLE]``."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="fedgate route", description="Validate route tables and explain lookups."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a route table and print a summary")
    check.add_argument("file", type=pathlib.Path)
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    show = sub.add_parser("show", help="explain the lookup of a party (and role)")
    show.add_argument("file", type=pathlib.Path)
    show.add_argument("party")
    show.add_argument("role", nargs="?", default="default")
    show.add_argument("--live", metavar="URL",
                      help="a running gateway's metrics endpoint (http://127.0.0.1:9372/metrics): add its view of "
                           "each endpoint's health and of the link to the party")
    args = parser.parse_args(list(argv))
    try:
        table = load_route_table(args.file)
    except ConfigError as exc:
        print(f"error: {exc}", file=err)
        return 1
    if args.command == "check":
        return _check(table, strict=args.strict, out=out, err=err)
    status = _show(table, args.party, args.role, out=out)
    if args.command == "show" and args.live and status == 0:
        return _show_live(table, args.party, args.role, args.live, out=out, err=err)
    return status


def _show_live(table: RouteTable, party: str, role: str, url: str, *, out: TextIO, err: TextIO) -> int:
    """Health as a running gateway sees it, read from its Prometheus endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {url}: {exc}", file=err)
        return 1
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.labels.get("endpoint") or sample.labels.get("peer")
            if key is not None:
                samples[(sample.name, key)] = sample.value
    route, _ = table.explain(party, role)
    assert route is not None
    print(f"live, from {url}:", file=out)
    for ep in route.endpoints:
        healthy = samples.get(("fedgate_route_endpoint_healthy", ep.address))
        failures = samples.get(("fedgate_route_endpoint_failures_total", ep.address), 0.0)
        state = "unknown (not used yet)" if healthy is None else ("healthy" if healthy else "FAILING")
        print(f"    {ep.address}: {state}, {failures:.0f} failure(s)", file=out)
    connected = samples.get(("fedgate_link_connected", party))
    outbox = samples.get(("fedgate_link_outbox_messages", party))
    if connected is not None or outbox is not None:
        depth = outbox or 0.0
        age = samples.get(("fedgate_link_outbox_oldest_age_seconds", party), 0.0)
        rtt = samples.get(("fedgate_link_rtt_seconds", party))
        print(f"  link to party {party}: {'connected' if connected else 'DOWN'}, outbox {depth:.0f} message(s)"
              f"{f', oldest {age:.1f} s' if depth else ''}{f', rtt {rtt * 1000:.1f} ms' if rtt else ''}", file=out)
    return 0


def _check(table: RouteTable, *, strict: bool, out: TextIO, err: TextIO) -> int:
    endpoints = table.endpoints()
    transports = Tally(ep.transport for ep in endpoints)
    warnings = list(table.warnings)
    for party, roles in table.entries.items():
        for role, eps in roles.items():
            for i, ep in enumerate(eps):
                for name, file in (
                    ("caFile", ep.ca_file),
                    ("certChainFile", ep.cert_file),
                    ("privateKeyFile", ep.key_file),
                ):
                    if file is not None and not os.access(file, os.R_OK):
                        warnings.append(
                            f"route_table.{party}.{role}[{i}].{name}: {file} is not readable here"
                        )
    print(f"{table.source}: {table.format} format", file=out)
    print(f"  self_party: {', '.join(table.self_parties) or '-'}", file=out)
    print(f"  default_allow: {str(table.default_allow).lower()}", file=out)
    print(
        f"  parties: {len(table.entries)} ({', '.join(list(table.entries)[:10])}"
        f"{', ...' if len(table.entries) > 10 else ''})",
        file=out,
    )
    print(f"  routes: {sum(len(r) for r in table.entries.values())}", file=out)
    print(
        f"  endpoints: {len(endpoints)} ({', '.join(f'{t} {n}' for t, n in sorted(transports.items()))}); "
        f"TLS on {sum(ep.use_tls for ep in endpoints)}",
        file=out,
    )
    for warning in warnings:
        print(f"warning: {warning}", file=err)
    if strict and warnings:
        print(f"{len(warnings)} warning(s), --strict: failing", file=err)
        return 1
    print("OK", file=out)
    return 0


def _show(table: RouteTable, party: str, role: str, *, out: TextIO) -> int:
    print(
        f"lookup party {party!r} role {role!r} in {table.source} "
        f"({table.format} format, default_allow {str(table.default_allow).lower()})",
        file=out,
    )
    if party in table.self_parties:
        print(f"  party {party!r} is in self_party: FATE messages to it are stored in this gateway", file=out)
    route, steps = table.explain(party, role)
    for n, step in enumerate(steps, 1):
        print(f"  {n}. {step}", file=out)
    if route is None:
        print(f"no route: {RouteError.__name__} (gRPC {RouteError.grpc_status})", file=out)
        return 1
    print(
        f"  route: party {route.matched_party!r} role {route.matched_role!r}, "
        f"{len(route.endpoints)} endpoint(s) (file order; the gateway orders them by health, then weight):",
        file=out,
    )
    for n, ep in enumerate(route.endpoints, 1):
        print(f"    {n}. {ep.describe()}", file=out)
    return 0
