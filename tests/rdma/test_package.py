"""The package surface: config section, transport choice, probe, and the sans-IO boundary."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import fedgate.rdma as rdma
from fedgate.config import config_from_data
from fedgate.errors import ConfigError
from fedgate.rdma import choose_transport, rdma_available

PACKAGE = pathlib.Path(rdma.__file__).parent
CORE_MODULES = ["_wire.py", "_credits.py", "_rendezvous.py", "_pool.py", "_session.py", "config.py", "probe.py"]
FORBIDDEN = {"asyncio", "socket", "time", "pyverbs", "ssl", "selectors", "grpc", "ctypes"}


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_modules_do_no_io(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN


def test_only_verbs_link_names_pyverbs() -> None:
    naming = {p.name for p in PACKAGE.glob("*.py") if "pyverbs." in p.read_text() and p.name != "verbs_link.py"}
    assert naming <= {"__init__.py", "probe.py"}  # docs and find_spec only
    assert "import pyverbs" not in (PACKAGE / "__init__.py").read_text()


def test_importing_the_package_does_not_import_pyverbs_or_the_carrier() -> None:
    code = "import sys, fedgate.rdma; print(sorted(m for m in sys.modules if 'pyverbs' in m or 'verbs_link' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert rdma.K_CARRIER_IMPORT == "fedgate.rdma.verbs_link:RdmaCarrier"


def test_config_section_loads_and_rejects_bad_values() -> None:
    config = config_from_data({"rdma": {"device": "mlx5_0", "recv_slots": 16, "slot_bytes": 8192}})
    assert config.rdma.device == "mlx5_0" and config.rdma.recv_slots == 16
    with pytest.raises(ConfigError, match=r"rdma\.recv_slots"):
        config_from_data({"rdma": {"recv_slots": 2}})
    with pytest.raises(ConfigError, match="rdma: unknown key"):
        config_from_data({"rdma": {"slots": 8}})


def test_create_carrier_builds_without_a_device() -> None:
    carrier = rdma.create_carrier(rdma.RdmaConfig())
    assert carrier.name == "rdma"  # the device opens on first connect/listen, not here


def _fake_sysfs(tmp_path: pathlib.Path, state: str) -> pathlib.Path:
    port = tmp_path / "rxe0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text(state)
    return tmp_path


def test_rdma_available_reports_why_not(tmp_path: pathlib.Path) -> None:
    ok, why = rdma_available(sysfs=tmp_path / "missing")
    assert not ok and "no RDMA device" in why
    ok, why = rdma_available(sysfs=_fake_sysfs(tmp_path / "down", "1: DOWN"))
    assert not ok and "no active port" in why
    ok, why = rdma_available("mlx5_0", sysfs=_fake_sysfs(tmp_path / "named", "4: ACTIVE"))
    assert not ok and "named mlx5_0" in why
    ok, why = rdma_available(sysfs=_fake_sysfs(tmp_path / "up", "4: ACTIVE"))
    assert ok or "pyverbs" in why  # the dev venv's Python has no pyverbs; Debian's does


def test_auto_picks_rdma_only_in_one_datacenter_with_devices_on_both_ends() -> None:
    yes = (True, "rxe0 port 1 active")
    assert (
        choose_transport("auto", local_datacenter="dc1", peer_datacenter="dc1", local_rdma=yes, peer_rdma=True)[0]
        == "rdma"
    )
    cases = [
        ("dc1", "dc2", yes, True, "different datacenters"),
        ("", "", yes, True, "different datacenters"),
        ("dc1", "dc1", (False, "no RDMA device in /sys"), True, "no local RDMA"),
        ("dc1", "dc1", yes, False, "does not list an RDMA device"),
    ]
    for local_dc, peer_dc, local, peer, reason in cases:
        transport, why = choose_transport(
            "auto", local_datacenter=local_dc, peer_datacenter=peer_dc, local_rdma=local, peer_rdma=peer
        )
        assert transport == "tcp" and reason in why
    assert choose_transport("rdma", local_datacenter="", peer_datacenter="x", local_rdma=yes, peer_rdma=False)[0] == (
        "rdma"
    )
