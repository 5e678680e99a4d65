"""The package surface: registry, config section, exports, and the sans-IO boundary."""

from __future__ import annotations

import ast
import pathlib

import pytest

import fedgate.congestion as congestion
from fedgate.config import config_from_data
from fedgate.congestion import K_CONTROLLERS, LtBbr, NewReno, check_controller_name, create_controller
from fedgate.errors import ConfigError, UnknownPluginError

PACKAGE = pathlib.Path(congestion.__file__).parent
CORE_MODULES = [
    "_base.py", "_ltbbr.py", "_newreno.py", "_pacer.py", "sim.py", "sim_bench.py", "config.py", "__init__.py"
]
FORBIDDEN = {"asyncio", "socket", "time", "aioquic", "uvloop", "grpc", "ssl", "selectors"}


def test_registry_names() -> None:
    assert sorted(K_CONTROLLERS) == ["ltbbr", "newreno"]
    assert isinstance(create_controller("ltbbr", max_datagram_size=1200), LtBbr)
    assert isinstance(create_controller("newreno", max_datagram_size=1200), NewReno)
    with pytest.raises(TypeError):
        K_CONTROLLERS["x"] = LtBbr  # type: ignore[index]


def test_unknown_controller_lists_valid_names() -> None:
    with pytest.raises(UnknownPluginError) as info:
        check_controller_name("cubic", path="quic.congestion_control")
    assert info.value.valid == ["ltbbr", "newreno"]
    assert "quic.congestion_control" in str(info.value)


def test_config_section_rejects_unknown_controller_at_load() -> None:
    with pytest.raises(ConfigError, match="valid names: ltbbr, newreno"):
        config_from_data({"quic": {"congestion_control": "bbr"}})
    with pytest.raises(ConfigError, match=r"quic: unknown key"):
        config_from_data({"quic": {"algoritm": "ltbbr"}})
    config = config_from_data({"quic": {"congestion_control": "newreno", "max_data_bytes": 1 << 24}})
    assert config.quic.congestion_control == "newreno"
    assert config.quic.max_data_bytes == 1 << 24


def test_all_is_in_sync() -> None:
    ours = {
        name
        for name, value in vars(congestion).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("fedgate.congestion")
    }
    assert set(congestion.__all__) == ours | {"K_CONTROLLERS"}
    assert all(hasattr(congestion, name) for name in congestion.__all__)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_modules_do_no_io(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, imported & FORBIDDEN
