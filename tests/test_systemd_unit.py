"""systemd/fedgate.service, its drop-ins and sysusers file, checked by systemd's own tools.

``systemd-analyze verify`` refuses units whose ExecStart binaries do not exist, so the unit is copied
to a temporary directory with /opt/fedgate rewritten to a temporary tree holding an executable stub.
The tools are part of the ``systemd`` package (``make test`` installs it); where they are absent the
tests that need them skip and say so.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
from collections import defaultdict

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "fedgate.service"
DROPINS = sorted((REPO / "systemd" / "dropins").glob("*.conf"))
SYSUSERS = REPO / "systemd" / "fedgate.sysusers"

K_MAX_EXPOSURE = 2.0  # systemd-analyze security score (0 = locked down, 10 = unprotected)


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package 'systemd')")
    return tool


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values in order (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


def stage(tmp_path: pathlib.Path, *, dropins: bool, extra: str = "") -> pathlib.Path:
    """Copy the unit (and drop-ins) under tmp_path with /opt/fedgate pointing at an executable stub."""
    prefix = tmp_path / "opt" / "fedgate"
    stub = prefix / ".venv" / "bin" / "fedgate"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    unit = units / "fedgate.service"
    unit.write_text(UNIT.read_text().replace("/opt/fedgate", str(prefix)) + extra)
    if dropins:
        (units / "fedgate.service.d").mkdir()
        for dropin in DROPINS:
            shutil.copy(dropin, units / "fedgate.service.d" / dropin.name)
    return unit


def verify(unit: pathlib.Path) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # only complaints about our files count; the host's own units are none of our business
    ours = [
        line for line in (proc.stdout + proc.stderr).splitlines()
        if str(unit.parent) in line or "fedgate" in line
    ]
    return proc.returncode, ours


def test_unit_verifies_cleanly(tmp_path: pathlib.Path) -> None:
    code, complaints = verify(stage(tmp_path, dropins=False))
    assert code == 0 and complaints == []


def test_unit_with_all_dropins_verifies_cleanly(tmp_path: pathlib.Path) -> None:
    assert DROPINS, "systemd/dropins/*.conf missing"
    code, complaints = verify(stage(tmp_path, dropins=True))
    assert code == 0 and complaints == []


def test_verify_would_catch_a_mistake(tmp_path: pathlib.Path) -> None:
    _, complaints = verify(stage(tmp_path, dropins=False, extra="[Service]\nProtectSytem=strict\n"))
    assert any("ProtectSytem" in line for line in complaints)


def test_missing_executable_is_caught(tmp_path: pathlib.Path) -> None:
    unit = stage(tmp_path, dropins=False)
    (tmp_path / "opt" / "fedgate" / ".venv" / "bin" / "fedgate").unlink()
    code, complaints = verify(unit)
    assert code != 0 and any("not executable" in line for line in complaints)


@pytest.mark.parametrize("with_dropins", [False, True])
def test_security_exposure_is_low(tmp_path: pathlib.Path, with_dropins: bool) -> None:
    unit = stage(tmp_path, dropins=with_dropins)
    proc = subprocess.run(
        [analyze(), "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    match = re.search(r"Overall exposure level for fedgate\.service: ([0-9.]+)", proc.stdout)
    if match is None and "offline" in proc.stderr:
        pytest.skip("this systemd-analyze has no offline security review (systemd < 250)")
    assert match is not None, proc.stdout + proc.stderr
    assert float(match.group(1)) <= K_MAX_EXPOSURE


def test_unit_has_the_settings_the_gateway_relies_on() -> None:
    unit = parse_unit(UNIT.read_text())
    svc = unit["Service"]

    def one(key: str) -> str:
        assert len(svc[key]) == 1, f"{key}: {svc[key]}"
        return svc[key][0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == "/opt/fedgate/.venv/bin/fedgate run --config /etc/fedgate/fedgate.toml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert re.fullmatch(r"\d+s", one("WatchdogSec"))
    assert one("User") == "fedgate"
    assert one("StateDirectory") == "fedgate"
    assert one("WorkingDirectory") == "/var/lib/fedgate"
    assert one("ConfigurationDirectory") == "fedgate"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "RestrictNamespaces",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "LockPersonality"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in svc["SystemCallFilter"]
    # drain (10 s by default) must fit inside the stop timeout
    assert int(one("TimeoutStopSec").rstrip("s")) > 10
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_rdma_dropin_opens_only_what_rdma_needs() -> None:
    rdma = parse_unit((REPO / "systemd" / "dropins" / "rdma.conf").read_text())["Service"]
    assert rdma["PrivateDevices"] == ["no"] and rdma["DevicePolicy"] == ["closed"]
    assert rdma["RestrictAddressFamilies"] == ["AF_NETLINK"]
    assert rdma["LimitMEMLOCK"] == ["infinity"]
    assert all("infiniband" in v for v in rdma["DeviceAllow"])


def test_sysusers_creates_the_unit_user(tmp_path: pathlib.Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed (Debian package 'systemd')")
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([tool, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    user = parse_unit(UNIT.read_text())["Service"]["User"][0]
    entry = next(line.split(":") for line in passwd if line.startswith(f"{user}:"))
    assert entry[5] == "/var/lib/fedgate" and entry[6] == "/usr/sbin/nologin"
    assert int(entry[2]) < 1000  # a system user
