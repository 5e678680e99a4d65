"""The route table reloader (real files, a real registry) and ``fedgate route`` (main_route)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pathlib
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from fedgate.config import RoutesConfig
from fedgate.errors import ConfigError
from fedgate.proxy.route_reload import RouteReloader, load_route_table, main_route

REPO = pathlib.Path(__file__).resolve().parents[2]


def rollsite(*parties: str, port: int = 9370) -> str:
    table = {p: {"default": [{"ip": "127.0.0.1", "port": port}]} for p in parties}
    return json.dumps({"route_table": table, "permission": {"default_allow": False}}, indent=1)


def write(path: pathlib.Path, text: str) -> None:
    path.write_text(text)


def replace_atomically(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float | None:
    return registry.get_sample_value(name, labels or {})


@pytest.fixture
def routes(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "route_table.json"
    write(path, rollsite("10000"))
    return path


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def reloader_for(path: pathlib.Path, registry: CollectorRegistry, interval: float = 0.5) -> RouteReloader:
    reloader = RouteReloader(RoutesConfig(file=path, poll_interval_s=interval), registry=registry)
    reloader.load_initial()
    return reloader


def parties(reloader: RouteReloader) -> set[str]:
    return set(reloader.router.table.entries)


def test_initial_load_sets_metrics(routes: pathlib.Path, registry: CollectorRegistry) -> None:
    reloader = reloader_for(routes, registry)
    assert parties(reloader) == {"10000"}
    assert sample(registry, "fedgate_route_table_reloads_total", {"result": "ok"}) == 1
    assert sample(registry, "fedgate_route_table_stale") == 0
    assert sample(registry, "fedgate_route_table_routes") == 1
    assert sample(registry, "fedgate_route_table_endpoints") == 1
    assert (sample(registry, "fedgate_route_table_last_success_timestamp_seconds") or 0) > 0


def test_bad_file_at_start_refuses(tmp_path: pathlib.Path, registry: CollectorRegistry) -> None:
    path = tmp_path / "r.json"
    write(path, '{"route_table": {"1": {"d": [{"ip": "a", "port": "x"}]}}}')
    with pytest.raises(ConfigError, match=r"r\.json:route_table\.1\.d\[0\]\.port"):
        reloader_for(path, registry)
    with pytest.raises(ConfigError, match="file not found"):
        reloader_for(tmp_path / "missing.json", registry=CollectorRegistry())


def test_poll_sees_nothing_when_unchanged(routes: pathlib.Path, registry: CollectorRegistry) -> None:
    reloader = reloader_for(routes, registry)
    assert reloader.poll() is None  # fresh mtime: re-read and compared by content, unchanged
    os.utime(routes, ns=(0, 1_000_000_000))  # touched: re-read, same content
    assert reloader.poll() is None
    assert reloader.poll() is None
    assert sample(registry, "fedgate_route_table_reloads_total", {"result": "ok"}) == 1


def test_in_place_edit_reloads_and_logs_a_diff(
    routes: pathlib.Path, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    reloader = reloader_for(routes, registry)
    router = reloader.router
    write(routes, rollsite("10000", "10001", "10002"))
    with caplog.at_level(logging.INFO, logger="fedgate.routes"):
        assert reloader.poll() is True
    assert reloader.router is router  # the same Router, a new snapshot
    assert parties(reloader) == {"10000", "10001", "10002"}
    messages = [r.getMessage() for r in caplog.records]
    assert "route table reloaded: +2 (10001/default, 10002/default) -0 ~0 routes" in messages
    assert sample(registry, "fedgate_route_table_reloads_total", {"result": "ok"}) == 2


def test_bad_edit_keeps_old_table_logs_why_once_and_counts(
    routes: pathlib.Path, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    reloader = reloader_for(routes, registry)
    old = reloader.router.table
    write(routes, '{"route_table": {\n "10000": {\n  "default": [{"ip": "a", "port": 70000}]}}}')
    with caplog.at_level(logging.INFO, logger="fedgate.routes"):
        assert reloader.poll() is False
        assert reloader.poll() is None  # the same bad file is reported once
    assert reloader.router.table is old
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    fields: dict[str, Any] = errors[0].fields  # type: ignore[attr-defined]
    assert fields["path"] == str(routes)
    assert fields["line"] == 3
    assert fields["key"] == "route_table.10000.default[0].port"
    assert "65535" in fields["error"]
    assert sample(registry, "fedgate_route_table_reloads_total", {"result": "error"}) == 1
    assert sample(registry, "fedgate_route_table_stale") == 1
    # fixing the file clears the stale flag
    write(routes, rollsite("10000", "20000"))
    assert reloader.poll() is True
    assert parties(reloader) == {"10000", "20000"}
    assert sample(registry, "fedgate_route_table_stale") == 0


def test_reverting_a_bad_file_to_the_previous_content_clears_stale(
    routes: pathlib.Path, registry: CollectorRegistry
) -> None:
    reloader = reloader_for(routes, registry)
    good = routes.read_text()
    write(routes, "{")
    assert reloader.poll() is False
    write(routes, good)
    assert reloader.poll() is True
    assert sample(registry, "fedgate_route_table_stale") == 0


def test_atomic_rename_is_seen(routes: pathlib.Path, registry: CollectorRegistry) -> None:
    reloader = reloader_for(routes, registry)
    replace_atomically(routes, rollsite("30000"))
    assert reloader.poll() is True
    assert parties(reloader) == {"30000"}


def test_same_size_same_mtime_rewrite_is_caught_by_content(
    routes: pathlib.Path, registry: CollectorRegistry
) -> None:
    reloader = reloader_for(routes, registry)
    st = os.stat(routes)
    write(routes, rollsite("10009"))  # same length as "10000"
    os.utime(routes, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(routes).st_size == st.st_size
    assert reloader.poll() is True  # the first read was racy (fresh mtime), so content is compared
    assert parties(reloader) == {"10009"}


def test_deleted_file_keeps_old_table_until_it_returns(
    routes: pathlib.Path, registry: CollectorRegistry
) -> None:
    reloader = reloader_for(routes, registry)
    routes.unlink()
    assert reloader.poll() is False
    assert reloader.poll() is None
    assert parties(reloader) == {"10000"}
    write(routes, rollsite("40000"))
    assert reloader.poll() is True
    assert parties(reloader) == {"40000"}


def test_forced_reload(routes: pathlib.Path, registry: CollectorRegistry) -> None:
    reloader = reloader_for(routes, registry)
    assert reloader.reload() is True
    write(routes, "not json")
    assert reloader.reload() is False
    assert parties(reloader) == {"10000"}
    assert reloader.poll() is None  # the poller does not report the same bad file again
    assert sample(registry, "fedgate_route_table_reloads_total", {"result": "error"}) == 1


def test_health_survives_reload_and_is_exported(routes: pathlib.Path, registry: CollectorRegistry) -> None:
    reloader = reloader_for(routes, registry)
    ep = reloader.router.table.entries["10000"]["default"][0]
    reloader.router.report_failure(ep, now=0.0, reason="refused")
    write(routes, rollsite("10000", "10001"))
    assert reloader.poll() is True
    labels = {"endpoint": "grpc://127.0.0.1:9370"}
    assert sample(registry, "fedgate_route_endpoint_healthy", labels) == 0
    assert sample(registry, "fedgate_route_endpoint_failures_total", labels) == 1
    reloader.router.report_success(ep, now=1.0)
    assert sample(registry, "fedgate_route_endpoint_healthy", labels) == 1


def test_run_polls_until_stopped(routes: pathlib.Path, registry: CollectorRegistry) -> None:
    async def scenario() -> set[str]:
        reloader = reloader_for(routes, registry, interval=0.02)
        stop = asyncio.Event()
        task = asyncio.create_task(reloader.run(stop))
        replace_atomically(routes, rollsite("50000"))
        for _ in range(500):  # wait for the change, up to ~10 s on a loaded machine
            if parties(reloader) == {"50000"}:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 10)
        return parties(reloader)

    assert asyncio.run(scenario()) == {"50000"}


# ------------------------------------------------------------------------------------------------ CLI


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main_route(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_check_ok_prints_a_summary() -> None:
    code, out, err = run_cli("check", str(REPO / "conf" / "route_table.json"))
    assert code == 0, err
    assert "osx format" in out and "self_party: 9999" in out and out.rstrip().endswith("OK")


def test_cli_check_bad_file_names_line_and_key(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.json"
    write(path, '{"route_table": {\n"1": {"d": [{"ip": "a", "port": 1, "transport": "ucx"}]}}}')
    code, out, err = run_cli("check", str(path))
    assert code == 1 and out == ""
    assert f"{path}:route_table.1.d[0].transport" in err and "line 2" in err and "'ucx'" in err


def test_cli_check_strict_fails_on_warnings(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "w.json"
    write(
        path,
        json.dumps(
            {
                "route_table": {
                    "1": {"d": [{"ip": "a", "port": 1, "useSSL": True, "caFile": str(tmp_path / "nope.pem")}]}
                }
            }
        ),
    )
    assert run_cli("check", str(path))[0] == 0
    code, _, err = run_cli("check", "--strict", str(path))
    assert code == 1 and "nope.pem is not readable" in err


def test_cli_show_explains_the_lookup(tmp_path: pathlib.Path) -> None:
    code, out, _ = run_cli("show", str(REPO / "conf" / "route_table.json"), "10000", "host")
    assert code == 0
    assert "1. party '10000': found" in out
    assert "2. role 'host': not under party '10000'; falling back to role 'default'" in out
    assert "tcp://127.0.0.1:9471 plaintext" in out


def test_cli_show_without_route_fails() -> None:
    code, out, _ = run_cli("show", str(REPO / "conf" / "route_table.json"), "31337")
    assert code == 1
    assert "party '31337': not in the table and no fallback (the table has no 'default' party)" in out
    assert "no route" in out


def test_cli_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("frobnicate")
    assert info.value.code == 2


def test_load_route_table_names_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_route_table(tmp_path / "none.json")
