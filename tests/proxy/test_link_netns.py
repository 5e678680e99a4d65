"""The link cut and restored for real: two gateway ends in their own network namespaces joined by a
veth pair; the veth is taken down mid-transfer for longer than the keepalive timeout, then brought back.

Needs root and ``ip netns`` (skipped with the reason where either is truly absent). The namespaces and
the veth pair are created here and removed in ``finally``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from fedgate.proxy.certs import issue_parties
from tests.proxy.test_link_sqlite import BIG, MESSAGES, SMALL, Child, dump

K_MIB = 1024 * 1024

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    tag = f"fgl{os.getpid() % 100000}"
    ns_a, ns_b = f"{tag}a", f"{tag}b"
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        _ip("link", "set", f"{tag}va", "netns", ns_a)
        _ip("link", "set", f"{tag}vb", "netns", ns_b)
        _ip("-n", ns_a, "addr", "add", "10.231.7.1/24", "dev", f"{tag}va")
        _ip("-n", ns_b, "addr", "add", "10.231.7.2/24", "dev", f"{tag}vb")
        for ns, dev in ((ns_a, f"{tag}va"), (ns_b, f"{tag}vb")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, f"{tag}va"
    finally:
        for ns in (ns_a, ns_b):  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_veth_down_longer_than_keepalive_then_up_resumes_exactly_once(
    netns: tuple[str, str, str], tmp_path: pathlib.Path
) -> None:
    ns_a, ns_b, veth_a = netns
    certs = tmp_path / "certs"
    issue_parties(certs, ["9999", "10000"])
    rx_db, tx_db = tmp_path / "rx.db", tmp_path / "tx.db"
    port = 9371
    receiver = Child("receiver", rx_db, port, certs, [], host="10.231.7.2", prefix=["ip", "netns", "exec", ns_b])
    sender = Child("sender", tx_db, port, certs, MESSAGES, host="10.231.7.2", prefix=["ip", "netns", "exec", ns_a])
    try:
        staged = receiver.wait_until(lambda s: s["staged"] >= 16 * K_MIB)["staged"]
        _ip("-n", ns_a, "link", "set", veth_a, "down")
        time.sleep(4.0)  # keepalive is 1 s: both ends declare the link dead after 3 s
        reconnects_while_down = sender.last["reconnects"]
        _ip("-n", ns_a, "link", "set", veth_a, "up")
        final = sender.wait_until(lambda s: s["depth"] == 0, timeout=90)
        assert reconnects_while_down >= 1 and final["reconnects"] >= 1
        # Resumed, not restarted: a restart would resend the 16+ MiB staged; the credit window (8 MiB) bounds
        # what was in flight when the cable went dead.
        assert final["sent"] <= BIG + 8 * K_MIB + SMALL * 2000
        assert staged < BIG
        receiver.kill()
        sender.kill()
        queue = dump(rx_db, certs)
        assert [q[0] for q in queue] == [m[0] for m in MESSAGES]
        assert all(ok for _, ok, _ in queue)
    finally:
        receiver.kill()
        sender.kill()
