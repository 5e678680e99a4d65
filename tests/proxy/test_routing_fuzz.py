"""Route table parsing under hypothesis: any input gives a RouteTable or a RouteTableError, never a crash.

Also checks properties that must hold for whatever parses: every (party, role) in a table looks up to
itself, the Router returns a permutation of the route's endpoints, and errors on a key path carry a
line number (the locator finds the key in the text).
"""

from __future__ import annotations

import json
import pathlib
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgate.proxy.routing import Router, RouteTable, RouteTableError, parse_route_data, parse_route_table

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = (REPO / "conf" / "route_table.json").read_bytes()

K_EXAMPLES = 300  # hypothesis examples per test (each test stays within a few seconds)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)

hosts = st.sampled_from(["127.0.0.1", "::1", "gw.example", "10.0.0.2"])
good_endpoint = st.fixed_dictionaries(
    {"ip": hosts, "port": st.integers(1, 65535) | st.integers(1, 65535).map(str)},
    optional={
        "is_secure": st.booleans(),
        "is_polling": st.booleans(),
        "protocol": st.just("grpc"),
        "transport": st.sampled_from(["grpc", "tcp", "quic", "rdma", "auto"]),
        "weight": st.integers(0, 100),
        "datacenter": st.text(max_size=4),
        "caFile": st.just("ca.pem"),
        "negotiationType": st.just("TLS"),
    },
)
noisy_endpoint = st.fixed_dictionaries(
    {},
    optional={
        "ip": st.sampled_from(["127.0.0.1", "", "a b", 5]) | json_values,
        "port": st.sampled_from([0, 1, 9370, 65536, "9370", "x", "٣", -1, True, 1.5]) | json_values,
        "is_secure": st.booleans() | json_values,
        "useSSL": st.booleans() | json_values,
        "protocol": st.sampled_from(["grpc", "http", "h2"]),
        "url": st.sampled_from(
            ["http://h:1/x", "https://h/x", "ftp://h", "http://[::1", "http://h:99999/", ""]
        ),
        "transport": st.sampled_from(["grpc", "ucx"]) | json_values,
        "weight": st.sampled_from([0, 1, -1, 10**7, True]) | json_values,
        "certChainFile": st.sampled_from(["c.pem", ""]),
        "privateKeyFile": st.sampled_from(["k.pem", ""]),
    },
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nine valid draws in ten, so that whole tables parse often enough to check their properties."""
    # (st.one_of(good, good, ..., bad) does not weight: hypothesis drops the repeated branches)
    return st.integers(0, 9).flatmap(lambda pick: good if pick else bad)


role_names = st.sampled_from(["default", "guest", "host", "fateflow"])
party_names = st.sampled_from(["default", "9999", "10000", "10001"])
roles = mostly(
    st.dictionaries(
        role_names,
        st.lists(mostly(good_endpoint, noisy_endpoint), min_size=1, max_size=3),
        min_size=1,
        max_size=3,
    ),
    st.dictionaries(role_names | st.just(""), st.lists(noisy_endpoint, max_size=2) | json_values, max_size=2),
)
tables = mostly(
    st.fixed_dictionaries(
        {"route_table": mostly(st.dictionaries(party_names, roles, max_size=4), json_values)},
        optional={
            "self_party": mostly(
                st.lists(party_names, max_size=2), st.lists(st.sampled_from([9999, True, ""]))
            ),
            "permission": st.fixed_dictionaries(
                {}, optional={"default_allow": mostly(st.booleans(), json_values)}
            ),
            "extra": json_values,
        },
    ),
    json_values,
)


def check_table(table: RouteTable) -> None:
    """Properties of any table that parsed."""
    router = Router(table, rng=random.Random(0))
    for party, by_role in table.entries.items():
        for role, eps in by_role.items():
            route = table.lookup(party, role)
            assert (route.matched_party, route.matched_role) == (party, role)
            assert route.endpoints == eps and eps
            ordered = router.route(party, role, now=0.0).endpoints
            assert sorted(map(repr, ordered)) == sorted(map(repr, eps))
    assert all(1 <= ep.port <= 65535 and ep.host for ep in table.endpoints())


def parse_text(text: str | bytes) -> RouteTable | RouteTableError:
    try:
        table = parse_route_table(text, source="fuzz.json")
    except RouteTableError as exc:
        assert exc.source == "fuzz.json"
        str(exc)
        return exc
    check_table(table)
    return table


@settings(max_examples=K_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables)
def test_fuzz_structured_tables(data: dict[str, Any]) -> None:
    result = parse_text(json.dumps(data, indent=1))
    if isinstance(result, RouteTableError) and result.path:
        assert result.line >= 1, f"no line for {result.path}"


@settings(max_examples=K_EXAMPLES, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    parse_text(data)


@settings(max_examples=K_EXAMPLES, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(SHIPPED)), st.integers(0, 3), st.binary(max_size=3)), max_size=4)
)
def test_fuzz_mutated_shipped_table(edits: list[tuple[int, int, bytes]]) -> None:
    data = bytearray(SHIPPED)
    for at, cut, insert in edits:
        data[at : at + cut] = insert
    result = parse_text(bytes(data))
    if isinstance(result, RouteTableError) and "invalid JSON" in result.message:
        assert result.line >= 1


@settings(max_examples=K_EXAMPLES, deadline=None)
@given(json_values | tables)
def test_fuzz_parse_route_data_with_python_values(data: Any) -> None:
    try:
        check_table(parse_route_data(data, source="mem"))
    except RouteTableError as exc:
        str(exc)


def test_deep_nesting_and_huge_numbers_are_errors() -> None:
    for text in (
        "[" * 100_000,
        '{"route_table": ' + "1" * 5000 + "}",
        '{"route_table": {"1": {"d": [{"ip": "a", "port": ' + "9" * 400 + "}]}}}",
    ):
        result = parse_text(text)
        assert isinstance(result, RouteTableError)
    assert isinstance(parse_text(b"\xef\xbb\xbf" + SHIPPED), RouteTable)  # a UTF-8 BOM is fine
