"""Route table parsing, lookup and the health-aware Router (pure core: no loop, explicit times)."""

from __future__ import annotations

import json
import pathlib
import random
from collections import Counter
from typing import Any

import pytest

from fedgate.errors import ConfigError, RouteError
from fedgate.proxy.routing import (
    Endpoint,
    Router,
    RouteTable,
    RouteTableError,
    diff_tables,
    parse_route_data,
    parse_route_table,
)

REPO = pathlib.Path(__file__).resolve().parents[2]

# The table eggroll ships with rollsite, verbatim apart from the addresses.
ROLLSITE = """{
  "route_table": {
    "10001": {
      "default": [{"port": 9370, "ip": "127.0.0.1"}]
    },
    "10002": {
      "default": [{"port": 9470, "ip": "10.0.0.2", "is_secure": true, "is_polling": false}],
      "fateflow": [{"port": 9360, "ip": "10.0.0.3"}]
    },
    "default": {
      "default": [{"port": 9570, "ip": "exchange.example"}]
    }
  },
  "permission": {
    "default_allow": true
  }
}
"""

# The shape FATE 2.x ships for OSX, with key-store fields fedgate ignores.
OSX = """{
  "self_party": ["9999"],
  "route_table": {
    "9999": {"fateflow": [{"port": 9360, "ip": "127.0.0.1"}]},
    "10000": {
      "default": [{
        "protocol": "grpc", "ip": "192.168.0.2", "port": 9370, "useSSL": true,
        "caFile": "/etc/fedgate/ca.pem", "certChainFile": "/etc/fedgate/me.pem",
        "privateKeyFile": "/etc/fedgate/me.key", "negotiationType": "TLS"
      }]
    },
    "10001": {
      "default": [{"protocol": "http", "url": "http://192.168.0.3:8087/osx/inbound"}]
    },
    "default": {"default": [{"ip": "192.168.0.9", "port": 9370}]}
  }
}
"""


def table(text: str, source: str = "routes.json") -> RouteTable:
    return parse_route_table(text.encode(), source=source)


def osx_with(endpoints: list[dict[str, Any]], **top: Any) -> str:
    return json.dumps({"self_party": ["9999"], "route_table": {"10000": {"default": endpoints}}, **top})


# ------------------------------------------------------------------------------------------- formats


def test_rollsite_format_loads_unchanged() -> None:
    t = table(ROLLSITE)
    assert t.format == "rollsite"
    assert t.self_parties == ()
    assert t.default_allow is True
    assert t.warnings == ()
    ep = t.entries["10002"]["default"][0]
    assert ep == Endpoint(host="10.0.0.2", port=9470, use_tls=True)
    assert t.source == "routes.json"


def test_osx_format_loads_unchanged_with_tls_files_and_ignored_keys_as_warnings() -> None:
    t = table(OSX)
    assert t.format == "osx"
    assert t.self_parties == ("9999",)
    assert t.default_allow is True  # OSX falls back to 'default' unless the file says otherwise
    ep = t.entries["10000"]["default"][0]
    assert ep.use_tls and ep.protocol == "grpc" and ep.transport == "grpc"
    assert ep.ca_file == pathlib.Path("/etc/fedgate/ca.pem")
    assert ep.cert_file == pathlib.Path("/etc/fedgate/me.pem")
    assert ep.key_file == pathlib.Path("/etc/fedgate/me.key")
    assert any("negotiationType" in w for w in t.warnings)


def test_osx_http_endpoint_takes_host_and_port_from_url() -> None:
    ep = table(OSX).entries["10001"]["default"][0]
    assert (ep.host, ep.port, ep.protocol) == ("192.168.0.3", 8087, "http")
    assert ep.url == "http://192.168.0.3:8087/osx/inbound"


def test_extensions_are_read() -> None:
    t = table(
        osx_with(
            [
                {"ip": "10.1.0.2", "port": 9371, "transport": "rdma", "weight": 5, "datacenter": "dc-a"},
                {"ip": "fe80::1", "port": 9371, "transport": "quic", "weight": 0},
            ]
        )
    )
    rdma, quic = t.entries["10000"]["default"]
    assert (rdma.transport, rdma.weight, rdma.datacenter) == ("rdma", 5, "dc-a")
    assert (quic.transport, quic.weight) == ("quic", 0)
    assert quic.address == "quic://[fe80::1]:9371"


def test_port_as_digit_string_is_accepted_like_fate_does() -> None:
    assert table(osx_with([{"ip": "a", "port": "9370"}])).entries["10000"]["default"][0].port == 9370


def test_shipped_default_table_is_valid_osx_for_party_9999() -> None:
    path = REPO / "conf" / "route_table.json"
    t = parse_route_table(path.read_bytes(), source=str(path))
    assert t.format == "osx" and t.warnings == ()
    assert t.is_local("9999", [])
    assert not t.is_local("10000", ["9999"])
    peer = t.lookup("10000", "guest").primary
    assert peer.host == "127.0.0.1" and peer.transport in ("tcp", "quic", "auto")
    with pytest.raises(RouteError):
        t.lookup("20000", "guest")


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "path", "line"),
    [
        (
            '{"route_table": {\n "10000": {\n  "default": [\n   {"ip": "a", "port": 0}]}}}',
            "route_table.10000.default[0].port",
            4,
        ),
        (
            '{"route_table": {\n "10000": {\n  "default": [\n   {"ip": "a"}]}}}',
            "route_table.10000.default[0]",
            4,
        ),
        ('{"route_table": {"10000": {"default": []}}}', "route_table.10000.default", 1),
        ('{"route_table": {"10000": {\n"default": {"ip": "a"}}}}', "route_table.10000.default", 2),
        (
            '{"route_table": {"10000": {"default": [{"ip": "a", "port": 1, "transport": "udp"}]}}}',
            "route_table.10000.default[0].transport",
            1,
        ),
        (
            '{"route_table": {"1": {"d": [{"ip": "a", "port": 1, "is_secure": "yes"}]}}}',
            "route_table.1.d[0].is_secure",
            1,
        ),
        (
            '{"route_table": {"1": {"d": [{"ip": "a", "port": 1, "weight": -1}]}}}',
            "route_table.1.d[0].weight",
            1,
        ),
        ('{"route_table": {"1": {"d": [{"ip": "a b", "port": 1}]}}}', "route_table.1.d[0].ip", 1),
        ('{"route_table": {}, "permission": {"default_allow": "true"}}', "permission.default_allow", 1),
        ('{"self_party": "9999", "route_table": {}}', "self_party", 1),
        ('{"permission": {}}', "", 1),
        ('{"route_table": {"1": {"": [{"ip": "a", "port": 1}]}}}', "route_table.1.", 1),
        ('{"route_table": {"": {"r": [{"ip": "a", "port": 1}]}}}', "route_table.", 1),
    ],
)
def test_errors_name_file_key_path_and_line(text: str, path: str, line: int) -> None:
    with pytest.raises(RouteTableError) as info:
        table(text, source="/etc/fedgate/route_table.json")
    err = info.value
    assert isinstance(err, ConfigError)
    assert err.path == path
    assert err.source == "/etc/fedgate/route_table.json"
    assert err.line == line
    assert str(err).startswith(f"/etc/fedgate/route_table.json:{path}")


def test_duplicate_key_path_points_at_the_last_occurrence() -> None:
    text = (
        '{"route_table": {\n"1": {"d": [{"ip": "a", "port": 1}]},\n"1": {"d": [{"ip": "a", "port": 99999}]}}}'
    )
    with pytest.raises(RouteTableError) as info:
        table(text)
    assert info.value.line == 3 and info.value.path == "route_table.1.d[0].port"


def test_duplicate_keys_warn() -> None:
    t = table('{"route_table": {"1": {"d": [{"ip": "a", "port": 1}]}, "1": {"d": [{"ip": "b", "port": 2}]}}}')
    assert t.entries["1"]["d"][0].host == "b"
    assert any("duplicate key '1'" in w for w in t.warnings)


def test_json_syntax_error_has_line_and_column() -> None:
    with pytest.raises(RouteTableError) as info:
        table('{\n  "route_table": {\n    "1": {,}\n  }\n}')
    assert (info.value.line, info.value.column) == (3, 11)
    assert "invalid JSON" in str(info.value)


def test_tls_conflicts_and_half_identities_are_errors() -> None:
    with pytest.raises(RouteTableError, match="disagree"):
        table(osx_with([{"ip": "a", "port": 1, "is_secure": True, "useSSL": False}]))
    with pytest.raises(RouteTableError, match="set together"):
        table(osx_with([{"ip": "a", "port": 1, "useSSL": True, "certChainFile": "c.pem"}]))
    with pytest.raises(RouteTableError, match="needs transport 'grpc'"):
        table(osx_with([{"url": "http://h:1/x", "protocol": "http", "transport": "quic"}]))


def test_tls_files_without_tls_warn() -> None:
    t = table(osx_with([{"ip": "a", "port": 1, "caFile": "ca.pem"}]))
    assert any("plaintext" in w for w in t.warnings)


def test_parse_route_data_without_text_has_path_but_no_line() -> None:
    with pytest.raises(RouteTableError) as info:
        parse_route_data({"route_table": {"1": {"d": [{"ip": "a", "port": True}]}}}, source="mem")
    assert info.value.path == "route_table.1.d[0].port" and info.value.line == 0


# -------------------------------------------------------------------------------------------- lookup


def test_lookup_exact_party_and_role() -> None:
    route = table(ROLLSITE).lookup("10002", "fateflow")
    assert (route.matched_party, route.matched_role) == ("10002", "fateflow")
    assert route.primary.port == 9360


def test_lookup_role_falls_back_to_default_role() -> None:
    route = table(ROLLSITE).lookup("10002", "guest")
    assert (route.matched_party, route.matched_role, route.role) == ("10002", "default", "guest")


def test_lookup_party_falls_back_to_default_party_only_with_default_allow() -> None:
    assert table(ROLLSITE).lookup("77777", "host").matched_party == "default"
    closed = table(ROLLSITE.replace('"default_allow": true', '"default_allow": false'))
    with pytest.raises(RouteError) as info:
        closed.lookup("77777", "host")
    assert "77777" in str(info.value) and "host" in str(info.value) and "routes.json" in str(info.value)
    assert "default_allow is false" in str(info.value)
    # the role fallback inside a known party still works without default_allow
    assert closed.lookup("10001", "guest").matched_role == "default"


def test_rollsite_without_permission_does_not_fall_back() -> None:
    t = table('{"route_table": {"default": {"default": [{"ip": "a", "port": 1}]}}}')
    assert t.default_allow is False
    assert any("never used" in w for w in t.warnings)
    with pytest.raises(RouteError):
        t.lookup("1", "r")


def test_osx_falls_back_unless_permission_says_no() -> None:
    assert table(OSX).lookup("55555", "guest").matched_party == "default"
    with pytest.raises(RouteError):
        table(OSX.replace('"self_party"', '"permission": {"default_allow": false}, "self_party"')).lookup(
            "5", "g"
        )


def test_missing_role_without_default_role_names_the_roles() -> None:
    with pytest.raises(RouteError, match=r"roles: fateflow"):
        table(OSX).lookup("9999", "guest")


def test_explain_lists_each_step() -> None:
    route, steps = table(ROLLSITE).explain("77777", "host")
    assert route is not None
    assert steps == [
        "party '77777': not in the table; falling back to party 'default' (default_allow)",
        "role 'host': not under party 'default'; falling back to role 'default'",
    ]


def test_is_local_uses_self_party_and_gateway_ids() -> None:
    t = table(OSX)
    assert t.is_local("9999", [])
    assert t.is_local("8888", ["8888"])
    assert not t.is_local("10000", ["8888"])


# -------------------------------------------------------------------------------------------- router

THREE = osx_with(
    [
        {"ip": "a", "port": 1, "weight": 1},
        {"ip": "b", "port": 1, "weight": 3},
        {"ip": "c", "port": 1, "weight": 0},
    ]
)


def hosts(router: Router, *, now: float) -> list[str]:
    return [ep.host for ep in router.route("10000", "guest", now=now).endpoints]


def test_weighted_choice_among_healthy_endpoints_and_standby_last() -> None:
    router = Router(table(THREE), rng=random.Random(7))
    firsts = Counter(hosts(router, now=0.0)[0] for _ in range(4000))
    assert set(firsts) == {"a", "b"}  # weight 0 is never first while others are healthy
    assert 2.5 < firsts["b"] / firsts["a"] < 3.5
    assert all(hosts(router, now=0.0)[-1] == "c" for _ in range(50))


def test_failover_cooldown_and_probe() -> None:
    t = table(THREE)
    router = Router(t, rng=random.Random(1), cooldown_initial_s=1.0, cooldown_max_s=8.0)
    a, b, _ = t.entries["10000"]["default"]
    router.report_failure(b, now=10.0, reason="connection refused")
    router.report_failure(a, now=10.0, reason="tls: bad certificate")
    # both weighted endpoints cool down: the standby leads, the cooling ones follow, soonest first
    assert hosts(router, now=10.5) == ["c", "a", "b"]
    stats = {s.address: s for s in router.statistics().endpoints}
    assert stats[b.address].healthy is False and stats[b.address].next_retry == 11.0
    assert stats[a.address].last_error == "tls: bad certificate"
    # after the cool-down one of them is probed first, once per cool-down period
    first = hosts(router, now=11.0)
    assert first[0] in ("a", "b") and first[1] == "c"
    second = hosts(router, now=11.0)
    assert second[0] != first[0]  # the other one's cool-down also ended: it is the next probe
    third = hosts(router, now=11.0)
    assert third[0] == "c"  # both probes leased: the healthy standby leads again


def test_cooldown_is_exponential_and_capped() -> None:
    t = table(THREE)
    router = Router(t, cooldown_initial_s=1.0, cooldown_max_s=8.0)
    a = t.entries["10000"]["default"][0]
    retries = []
    for _ in range(6):
        router.report_failure(a, now=100.0, reason="x")
        stats = {s.address: s for s in router.statistics().endpoints}
        retries.append(stats[a.address].next_retry)
    assert retries == [101.0, 102.0, 104.0, 108.0, 108.0, 108.0]
    assert stats[a.address].failures == 6 and stats[a.address].total_failures == 6


def test_success_restores_health() -> None:
    t = table(THREE)
    router = Router(t, rng=random.Random(3))
    a = t.entries["10000"]["default"][0]
    router.report_failure(a, now=0.0, reason="timeout")
    router.report_success(a, now=0.5)
    stats = {s.address: s for s in router.statistics().endpoints}[a.address]
    assert stats.healthy and stats.failures == 0 and stats.total_failures == 1 and stats.successes == 1
    assert stats.next_retry is None
    assert "a" in hosts(router, now=0.5)[:2]


def test_single_endpoint_route_is_returned_even_when_failed() -> None:
    t = table(osx_with([{"ip": "only", "port": 1}]))
    router = Router(t)
    router.report_failure(t.entries["10000"]["default"][0], now=0.0, reason="down")
    assert hosts(router, now=0.1) == ["only"]


def test_swap_is_atomic_and_keeps_health_of_remaining_endpoints() -> None:
    old = table(THREE)
    router = Router(old, rng=random.Random(5))
    a, b, _ = old.entries["10000"]["default"]
    router.report_failure(a, now=0.0, reason="down")
    router.report_failure(b, now=0.0, reason="down")
    new = table(osx_with([{"ip": "a", "port": 1, "weight": 2}, {"ip": "d", "port": 1}]))
    diff = router.swap(new)
    assert router.table is new
    assert diff.changed == (("10000", "default"),) and not diff.added and not diff.removed
    stats = {s.address: s for s in router.statistics().endpoints}
    assert set(stats) == {"grpc://a:1", "grpc://d:1"}
    assert stats["grpc://a:1"].failures == 1  # health survives, keyed by transport/host/port
    # a report about an endpoint removed by the reload is ignored
    router.report_failure(b, now=0.0, reason="late")
    assert "grpc://b:1" not in {s.address for s in router.statistics().endpoints}
    assert hosts(router, now=0.1) == ["d", "a"]


def test_router_raises_route_error_for_unknown_party() -> None:
    with pytest.raises(RouteError):
        Router(table(ROLLSITE.replace("true", "false"))).route("1", "r", now=0.0)


def test_diff_summary_is_one_line() -> None:
    old, new = table(ROLLSITE), table(ROLLSITE.replace('"10001"', '"10003"').replace("true", "false"))
    diff = diff_tables(old, new)
    assert diff.added == (("10003", "default"),) and diff.removed == (("10001", "default"),)
    assert (
        diff.summary()
        == "+1 (10003/default) -1 (10001/default) ~1 (10002/default) routes; default_allow changed"
    )
    assert diff_tables(old, old).empty
    assert "\n" not in diff.summary()
