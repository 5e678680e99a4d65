"""The link over TCP + mTLS with the real SQLite store: quota backpressure, and kill -9 of either end.

The kill tests run each gateway end as a child process (``python -c CHILD``) on its own database and
kill it with SIGKILL mid-transfer of a large message, then start it again on the same database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import fedgate
from fedgate.config import StoreConfig
from fedgate.proxy.certs import client_context, issue_parties, party_files, server_context
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import LinkParams
from fedgate.proxy.link_listener import LinkListener
from fedgate.proxy.link_sender import LinkSender, carrier_dial
from fedgate.proxy.store import SqliteStore, outbox_of
from fedgate.proxy.tcp_carrier import TcpCarrier

REPO = pathlib.Path(fedgate.__file__).resolve().parent.parent
SENDER, RECEIVER = "9999", "10000"
K_MIB = 1024 * 1024
BIG = 48 * K_MIB
SMALL = 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("certs")
    issue_parties(d, [SENDER, RECEIVER])
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def payload(mid: str, size: int) -> bytes:
    block = hashlib.sha256(mid.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def test_quota_full_receiver_holds_back_then_delivers_everything(certs: pathlib.Path, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        rx = await SqliteStore.open(StoreConfig(path=tmp_path / "rx.db", max_bytes=K_MIB, min_free_bytes=0),
                                    max_message_bytes=K_MIB)
        tx = await SqliteStore.open(StoreConfig(path=tmp_path / "tx.db", min_free_bytes=0), max_message_bytes=K_MIB)
        carrier = TcpCarrier()
        listener = LinkListener(params=LinkParams(RECEIVER, chunk_bytes=64 * 1024, window_bytes=512 * 1024),
                                inbox=rx, allow=lambda p: p == SENDER, retry_max_s=0.05)
        server = await carrier.listen(
            "127.0.0.1", 0, tls=server_context(*party_files(certs, RECEIVER)), handler=listener.handle)
        sender = LinkSender(
            peer=RECEIVER, params=LinkParams(SENDER, chunk_bytes=64 * 1024), outbox=outbox_of(tx),
            dial=carrier_dial(carrier.connect, "127.0.0.1", server.port, server_hostname=None, timeout=5.0,
                              tls=client_context(*party_files(certs, SENDER))))
        ids = [f"q{i:03d}" for i in range(40)]
        for mid in ids:  # 40 x 100 KiB = 4 MiB against a 1 MiB quota
            await tx.outbox_put(RECEIVER, Envelope(message_id=mid, session_id="s", topic="t", src_party=SENDER,
                                                   dst_party=RECEIVER, payload=payload(mid, 100 * 1024)))
        task = asyncio.create_task(sender.run())
        got: list[str] = []
        async with asyncio.timeout(60):
            while listener.statistics().store_full_retries < 3:
                await asyncio.sleep(0.01)
            assert (await tx.outbox_depth(RECEIVER))[0] > 0  # held back, not dropped
            while len(got) < len(ids):  # a local worker pops: space frees up and the rest flows in
                env = await rx.pop("s", "t", timeout=1.0)
                if env is not None:
                    assert env.payload == payload(env.message_id, 100 * 1024)
                    got.append(env.message_id)
            while (await tx.outbox_depth(RECEIVER))[0]:
                await asyncio.sleep(0.01)
        assert got == ids
        await sender.aclose()
        task.cancel()
        await server.aclose()
        await rx.aclose()
        await tx.aclose()

    asyncio.run(main())


CHILD = r"""
import asyncio, hashlib, json, pathlib, sys
from fedgate.config import StoreConfig
from fedgate.proxy.certs import client_context, server_context
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.link_core import LinkParams
from fedgate.proxy.link_listener import LinkListener
from fedgate.proxy.link_sender import LinkSender, carrier_dial
from fedgate.proxy.store import SqliteStore, outbox_of
from fedgate.proxy.tcp_carrier import TcpCarrier

role, db, port, certs, put = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4]), sys.argv[5]
host = sys.argv[6]
SENDER, RECEIVER, MIB = "9999", "10000", 1024 * 1024
PARAMS = dict(chunk_bytes=MIB, window_bytes=8 * MIB, keepalive_s=1.0)

def payload(mid, size):
    block = hashlib.sha256(mid.encode()).digest()
    return (block * (size // len(block) + 1))[:size]

def tls(party, make):
    return make(certs / "ca.pem", certs / f"party-{party}.pem", certs / f"party-{party}.key")

async def main():
    store = await SqliteStore.open(StoreConfig(path=pathlib.Path(db), min_free_bytes=0), max_message_bytes=1 << 30)
    carrier = TcpCarrier()
    if role == "receiver":
        listener = LinkListener(params=LinkParams(RECEIVER, **PARAMS), inbox=store, allow=lambda p: p == SENDER)
        await carrier.listen(host, port, tls=tls(RECEIVER, server_context), handler=listener.handle)
        while True:
            st = listener.statistics()
            print(json.dumps({"received": st.bytes_received, "staged": await store.partial_size("big"),
                              "stored": st.messages_stored}), flush=True)
            await asyncio.sleep(0.01)
    elif role == "sender":
        outbox = outbox_of(store)
        for mid, size in json.loads(put):
            await outbox.put(RECEIVER, Envelope(message_id=mid, session_id="s", topic="t", src_party=SENDER,
                                                dst_party=RECEIVER, payload=payload(mid, size)))
        sender = LinkSender(peer=RECEIVER, params=LinkParams(SENDER, **PARAMS), outbox=outbox,
                            dial=carrier_dial(carrier.connect, host, port, tls=tls(SENDER, client_context),
                                              server_hostname=None, timeout=5.0),
                            backoff_initial_s=0.05, backoff_max_s=0.2)
        task = asyncio.create_task(sender.run())
        while True:
            st = sender.statistics()
            print(json.dumps({"depth": (await store.outbox_depth(RECEIVER))[0], "sent": st.bytes_sent,
                              "reconnects": st.reconnects}), flush=True)
            await asyncio.sleep(0.01)
    else:  # dump the queue
        out = []
        while (env := await store.pop_nowait("s", "t")) is not None:
            out.append([env.message_id, env.payload == payload(env.message_id, env.size), env.size])
        print(json.dumps({"queue": out}), flush=True)
        await store.aclose()

asyncio.run(main())
"""


class Child:
    """A gateway end in a child process; ``last`` is its latest JSON status line."""

    def __init__(self, role: str, db: pathlib.Path, port: int, certs: pathlib.Path, put: list[Any], *,
                 host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", CHILD, role, str(db), str(port), str(certs), json.dumps(put), host],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={
                **os.environ, "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            })
        self.last: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.last = json.loads(line)

    def wait_until(self, cond: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.last
            if last and cond(last):
                return last
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(f"condition not met; last status {self.last}, exit {self.proc.poll()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def dump(db: pathlib.Path, certs: pathlib.Path) -> list[list[Any]]:
    child = Child("dump", db, 0, certs, [])
    child.proc.wait(60)
    child._thread.join(10)
    return list(child.last["queue"])


MESSAGES = [["big", BIG]] + [[f"s{i:02d}", 1000 + i] for i in range(SMALL)]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["receiver", "sender"])
def test_kill9_mid_transfer_resumes_and_delivers_exactly_once(
    victim: str, certs: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    port = free_port()
    rx_db, tx_db = tmp_path / "rx.db", tmp_path / "tx.db"
    children = [Child("receiver", rx_db, port, certs, []), Child("sender", tx_db, port, certs, MESSAGES)]
    try:
        receiver, sender = children
        staged = receiver.wait_until(lambda s: s["staged"] >= 16 * K_MIB)["staged"]
        if victim == "receiver":
            receiver.kill()
            receiver = Child("receiver", rx_db, port, certs, [])
            children.append(receiver)
        else:
            sender.kill()
            sender = Child("sender", tx_db, port, certs, [])
            children.append(sender)
        sender.wait_until(lambda s: s["depth"] == 0)
        after = receiver.wait_until(lambda s: s["stored"] >= 1 if victim == "receiver" else True)
        # Resumed: the second half moved at most the rest of the payload plus the credit window (8 MiB) and
        # the small messages, never the whole payload again.
        if victim == "receiver":
            assert after["received"] <= BIG - staged + 8 * K_MIB + SMALL * 2000
        else:
            assert sender.last["sent"] <= BIG - staged + 8 * K_MIB + SMALL * 2000
        for child in children:
            child.kill()
        queue = dump(rx_db, certs)
        assert [q[0] for q in queue] == [m[0] for m in MESSAGES]  # exactly once, in order
        assert all(ok for _, ok, _ in queue) and queue[0][2] == BIG
    finally:
        for child in children:
            child.kill()
