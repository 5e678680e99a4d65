"""Fixtures for the bench tests that need root: a TUN link between two fresh namespaces."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedgate.bench import LinkEmulator, Sandbox, netem_available, open_link

K_FORWARDER_PRIORITY = 10  # SCHED_FIFO: the emulator keeps its timing when other work loads the host
K_PROBE_PRIORITY = 5  # SCHED_FIFO: probes time packets without being descheduled by other work
K_NEEDS = "needs root, /dev/net/tun and iproute2 (network namespaces, TUN devices)"


def root_features_absent() -> bool:
    return os.geteuid() != 0 or not Path("/dev/net/tun").exists() or shutil.which("ip") is None


needs_root = pytest.mark.skipif(root_features_absent(), reason=K_NEEDS)


def our_netns(pid: int) -> list[str]:
    """Namespaces a harness process ``pid`` created (its names embed the pid)."""
    netns = Path("/run/netns")
    return (
        sorted(p.name for p in netns.iterdir() if p.name.startswith(f"fgb-{pid}-")) if netns.is_dir() else []
    )


class LinkUnderTest:
    """A TUN link and a way to run probes on either side of it."""

    def __init__(self, sandbox: Sandbox, link: LinkEmulator) -> None:
        self.sandbox = sandbox
        self.link = link
        self.port = 30000

    def probe(self, side: str, args: list[str], *, timeout: float = 60.0) -> dict[str, Any]:
        """Run ``udp_probe args`` in namespace ``a`` or ``b``; return its JSON line."""
        ns = self.link.ns_a if side == "a" else self.link.ns_b
        proc = self.sandbox.python("fedgate.bench.udp_probe", args, netns=ns, rt_priority=K_PROBE_PRIORITY)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def start(self, side: str, args: list[str]) -> Any:
        ns = self.link.ns_a if side == "a" else self.link.ns_b
        return self.sandbox.python("fedgate.bench.udp_probe", args, netns=ns, rt_priority=K_PROBE_PRIORITY)

    def next_port(self) -> int:
        self.port += 1
        return self.port


@pytest.fixture(scope="module", params=["tun", "netem"])
def emulated_link(request: pytest.FixtureRequest) -> Iterator[LinkUnderTest]:
    """Each emulator in turn; netem only where the kernel has sch_netem (this project's machines do not)."""
    kind: str = request.param
    if kind == "netem":
        ok, why = netem_available()
        if not ok:
            pytest.skip(f"kernel netem absent here ({why[-120:]}); the TUN emulator covers this host")
    with Sandbox() as sandbox:
        link = open_link(kind, sandbox, seed=11, rt_priority=K_FORWARDER_PRIORITY)
        yield LinkUnderTest(sandbox, link)
        link.close()
    assert our_netns(os.getpid()) == []
