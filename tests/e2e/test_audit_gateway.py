"""The audit chain and ledger inside running gateways: a dangerous pickle is refused at the front with a
status naming the rule; accepted messages cross the link; both ledgers verify and reconcile."""

from __future__ import annotations

import asyncio
import os
import pathlib
import pickle
import subprocess
import sys
from typing import Any

import grpc
import grpc.aio
import pytest

from fedgate.proxy.osx_client import OsxQueueClient
from fedgate.proxy.protos import osx_pb2
from tests.proxy.gateways import build, front_of, gateway_data, running

SESSION = "audit-session"
TOPIC = f"{SESSION}-guest-9999-host-10000-grad"


class Gadget:
    """Pickles to ``os.system("...")``: what a malicious party would send. Never unpickled here."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned > /tmp/fedgate-pwned",))


def fate_message(obj: object) -> bytes:
    body = b"\x00" + pickle.dumps(obj, protocol=4)  # FATE object bytes: inline mode byte + pickle
    return osx_pb2.Message(msgId="m", head=b'{"correlation_id": "0"}', body=body).SerializeToString()


def test_dangerous_pickle_refused_accepted_ones_delivered_and_ledgers_agree(tmp_path: pathlib.Path) -> None:
    b = gateway_data(tmp_path, "10000", {"9999": {"default": [{"ip": "127.0.0.1", "port": 1, "transport": "tcp"}]}},
                     audit={"enabled": True})
    a = gateway_data(tmp_path, "9999", {"10000": {"default": [
        {"ip": "127.0.0.1", "port": int(b["link"]["listen"].rsplit(":", 1)[1]), "transport": "tcp"}]}},
        audit={"enabled": True})

    async def main() -> None:
        async with running(build(b)), running(build(a)):
            pusher = OsxQueueClient(f"127.0.0.1:{front_of(a)}", party="9999")
            popper = OsxQueueClient(f"127.0.0.1:{front_of(b)}", party="10000")
            good = [fate_message({"round": i, "weights": [0.5, 1.5]}) for i in range(5)]
            for payload in good:
                await pusher.push(session=SESSION, topic=TOPIC, target="10000", payload=payload)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pusher.push(session=SESSION, topic=TOPIC, target="10000", payload=fate_message(Gadget()))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "system" in (info.value.details() or "")  # names the global it refused
            assert [await popper.pop(session=SESSION, topic=TOPIC, timeout=20) for _ in good] == good
            await pusher.aclose()
            await popper.aclose()

    asyncio.run(main())
    assert not pathlib.Path("/tmp/fedgate-pwned").exists()

    def audit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedgate", "audit", *args], capture_output=True, text=True,
                              timeout=60, check=False)

    for party in ("9999", "10000"):
        home = tmp_path / party
        verified = audit("verify", "--ledger", str(home / "ledger.db"), "--key", str(home / "ledger-signing.key"))
        assert verified.returncode == 0, verified.stdout + verified.stderr
    exported = audit("export", "--ledger", str(tmp_path / "9999" / "ledger.db"), "--session", SESSION)
    lines = exported.stdout.strip().splitlines()
    assert len(lines) == 6 and sum('"reject"' in line for line in lines) == 1
    reconciled = audit("reconcile", "--ours", str(tmp_path / "9999" / "ledger.db"),
                       "--theirs", str(tmp_path / "10000" / "ledger.db"), "--session", SESSION)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
