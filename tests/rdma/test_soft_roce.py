"""The RDMA carrier on a real soft-RoCE device: boots the QEMU rig once, one test per guest case.

Skips (with the rig's reason) only when QEMU, the kernel package or the RDMA userspace cannot be
installed; any other rig failure fails every case.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests.rdma.guest_soft_roce import CASES

REPO = pathlib.Path(__file__).resolve().parents[2]
RIG = REPO / "scripts" / "rdma-qemu-rig.py"
K_RIG_TIMEOUT = 540  # seconds for the whole guest run (boot and every case)
K_EXIT_SKIP = 77
K_INSTALL_TIMEOUT = 900  # seconds for apt-get installs and the kernel download on a fresh machine

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(K_RIG_TIMEOUT + K_INSTALL_TIMEOUT)]


@pytest.fixture(scope="module")
def guest_results() -> Iterator[dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="fedgate-rdma-rig-") as out:
        cmd = [
            sys.executable, str(RIG), "--out", out, "--timeout", str(K_RIG_TIMEOUT),
            "--", "/usr/bin/python3", str(REPO / "tests" / "rdma" / "guest_soft_roce.py"),
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=K_RIG_TIMEOUT + K_INSTALL_TIMEOUT
        )
        if proc.returncode == K_EXIT_SKIP:
            reason = next((line for line in proc.stdout.splitlines() if line.startswith("SKIP:")), "SKIP: rig")
            pytest.skip(reason[len("SKIP: ") :])
        results_file = pathlib.Path(out) / "results.json"
        if not results_file.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            pytest.fail(f"the QEMU rig produced no results (exit {proc.returncode}):\n{tail}")
        yield json.loads(results_file.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_soft_roce(guest_results: dict[str, str], case: str) -> None:
    assert case in guest_results, f"case {case} did not run"
    assert guest_results[case] == "ok", guest_results[case]
