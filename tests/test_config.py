"""The typed configuration tree (fedgate.config) and its strict loader (fedgate.configtree).

Example tests pin the error messages (dotted path and file); hypothesis fuzzes the loader with
arbitrary nested data and arbitrary TOML text: the answer is a config or a ConfigError, never
another exception.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import tempfile
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgate.config import FedgateConfig, config_from_data, load_config, parse_hostport
from fedgate.configtree import build, dump, load_toml
from fedgate.errors import ConfigError

# ---------------------------------------------------------------------------------------------- examples


def test_empty_config_is_valid_and_dump_round_trips() -> None:
    config = config_from_data({})
    assert config == FedgateConfig()
    assert config_from_data(dump(config)) == config


def test_unknown_key_names_path_and_file() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_data({"link": {"keepalive": 3}}, source="/etc/fedgate/fedgate.toml")
    assert info.value.path == "link"
    assert str(info.value).startswith("/etc/fedgate/fedgate.toml:link: unknown key(s) ['keepalive']")
    with pytest.raises(ConfigError, match=r"<root>: unknown key\(s\) \['routs'\]"):
        config_from_data({"routs": {}})


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        ({"front": {"listen": 9370}}, "front.listen", "expected a string"),
        ({"link": {"insecure": "yes"}}, "link.insecure", "expected true or false"),
        ({"link": {"chunk_bytes": 1.5}}, "link.chunk_bytes", "expected an integer"),
        ({"link": {"chunk_bytes": True}}, "link.chunk_bytes", "expected an integer"),
        ({"link": {"chunk_bytes": 1}}, "link.chunk_bytes", "must be >= 4096"),
        ({"routes": {"poll_interval_s": 0}}, "routes.poll_interval_s", "must be > 0"),
        ({"routes": {"poll_interval_s": float("nan")}}, "routes.poll_interval_s", "finite"),
        ({"log": {"format": "xml"}}, "log.format", "is not one of ['plain', 'json']"),
        ({"gateway": {"party_ids": []}}, "gateway.party_ids", "must not be empty"),
        ({"gateway": {"party_ids": [9999]}}, "gateway.party_ids[0]", "expected a string"),
        ({"gateway": {"party_ids": ["1", "1"]}}, "gateway.party_ids", "repeat"),
        ({"store": {"path": ""}}, "store.path", "expected a path string"),
        ({"front": {"listen": "localhost"}}, "front.listen", "expected host:port"),
        ({"front": {"listen": "h:70000"}}, "front.listen", "out of range"),
        ({"tls": {"cert_file": "c.pem"}}, "tls", "set together"),
        ({"tls": {"front": True}}, "tls.front", "needs cert_file"),
        ({"link": {"backoff_initial_s": 5, "backoff_max_s": 1}}, "link.backoff_max_s", ">= link.backoff"),
        ({"front": []}, "front", "expected a table"),
    ],
)
def test_bad_values_name_the_dotted_path(data: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_data(data, source="f.toml")
    assert info.value.path == path
    assert info.value.source == "f.toml"
    assert fragment in info.value.message


def test_ints_are_accepted_for_floats_and_paths_become_paths() -> None:
    config = config_from_data({"routes": {"poll_interval_s": 1, "file": "/etc/fedgate/route_table.json"}})
    assert config.routes.poll_interval_s == 1.0 and isinstance(config.routes.poll_interval_s, float)
    assert config.routes.file == pathlib.Path("/etc/fedgate/route_table.json")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9370", ("127.0.0.1", 9370)),
        ("[::1]:0", ("::1", 0)),
        ("gw.example:65535", ("gw.example", 65535)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:", "host:http", "host:-1", "host:²", "host:٣"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_hostport(text, path="x")


def test_load_config_reports_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fedgate.toml"
    path.write_text('[gateway]\nparty_ids = ["9999", "10000"]\n[log]\nformat = "json"\n')
    config = load_config(path)
    assert config.gateway.party_ids == ("9999", "10000") and config.log.format == "json"
    path.write_text("[gateway\n")
    with pytest.raises(ConfigError, match=r"fedgate\.toml: invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    path.write_text("[store]\nmax_bytes = 12\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path) and info.value.path == "store.max_bytes"


def test_build_rejects_non_dataclasses_loudly() -> None:
    with pytest.raises(TypeError):
        build(int, {})


# ------------------------------------------------------------------------------------------------ fuzzing

K_EXAMPLES = 300  # hypothesis examples per fuzz test (keeps each under a few seconds on 2 cores)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),  # beyond float range
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["127.0.0.1:9370", "[::1]:0", "h:99999", "json", "plain", "full", "auto", "", "x:²"]),
    st.datetimes(),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _section_strategy(cls: type[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts that mostly use the section's real keys (so the fuzzer gets past 'unknown key')."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    per_key: dict[str, st.SearchStrategy[Any]] = {}
    for name in names:
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            per_key[name] = _section_strategy(tp) | values
        else:
            per_key[name] = values
    known = st.fixed_dictionaries({}, optional=per_key)
    return st.one_of(known, known, st.dictionaries(st.sampled_from([*names, "typo"]), values, max_size=3))


configs = _section_strategy(FedgateConfig)


@settings(max_examples=K_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_fuzz_structured_data_gives_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    try:
        config = config_from_data(data, source="fuzz.toml")
    except ConfigError as exc:
        assert exc.source == "fuzz.toml"
        str(exc)  # the message itself must render
    else:
        assert isinstance(config, FedgateConfig)
        assert config_from_data(dump(config)) == config


@settings(max_examples=K_EXAMPLES, deadline=None)
@given(values)
def test_fuzz_arbitrary_data_gives_a_config_or_a_config_error(data: Any) -> None:
    try:
        config_from_data(data)
    except ConfigError as exc:
        str(exc)


toml_fragments = st.lists(
    st.sampled_from([
        "[gateway]\n", "[front]\n", "[link]\n", "[routes]\n", "[[x]]\n", "party_ids = [\"1\"]\n", "listen = ",
        "\"127.0.0.1:1\"\n", "chunk_bytes = ", "1" * 5000, "\n", "1e400\n", "nan\n", "2026-11-27T11:00:00Z\n",
        "'''\n", "= =\n", "\x00", "\ufeff", "insecure = true\n", "format = \"json\"\n",
    ]) | st.text(max_size=10),
    max_size=12,
).map("".join)


@settings(max_examples=K_EXAMPLES, deadline=None)
@given(st.one_of(toml_fragments, st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_fuzz_toml_text_gives_a_config_or_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "fedgate.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            load_config(path)
        except ConfigError as exc:
            assert exc.source == str(path)


def test_toml_integer_beyond_digit_limit_is_a_config_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text("[link]\nchunk_bytes = " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError):
        load_toml(path)


def test_datetime_where_a_string_is_expected_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected a string"):
        config_from_data({"front": {"listen": datetime.datetime(2026, 1, 1)}})


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"front": {"listen": 10**5000}}, "front.listen"),  # str field: the message must not repr the int
        ({"link": {"chunk_bytes": 10**5000}}, "link.chunk_bytes"),  # int field: the range message
        ({"routes": {"poll_interval_s": 10**400}}, "routes.poll_interval_s"),  # float field: float() overflow
        ({"log": {"format": -(10**5000)}}, "log.format"),  # Literal field
    ],
)
def test_huge_integers_are_config_errors(data: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_data(data)
    assert info.value.path == path
