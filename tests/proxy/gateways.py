"""Test helpers: real gateways on 127.0.0.1, in this process or as child processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fedgate.app import Gateway
from fedgate.config import FedgateConfig, config_from_data

_handed_out: set[int] = set()


def _test_ports() -> tuple[int, int]:
    """12,000 ports just below the kernel's ephemeral range (32768-60999 by default)."""
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(1024, low - 12000), max(1025, low)


def free_port() -> int:
    """A port on 127.0.0.1 free for both TCP and UDP (a link listens on both), outside the ephemeral range.

    A port the kernel picked with bind(0) is an ephemeral one: by the time a gateway binds it, an
    outgoing connection (gRPC, a link, a QUIC client's UDP socket) may have been given it as its source
    port ("address already in use", seen once in CI). Ports below the ephemeral range are never handed
    to outgoing sockets; this process never hands out the same one twice.
    """
    rng = random.Random()
    ports = _test_ports()
    for _ in range(1000):
        port = rng.randrange(*ports)
        if port in _handed_out:
            continue
        try:
            with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {ports}")


def gateway_data(root: pathlib.Path, party: str, routes: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """Config data for a gateway of ``party`` under ``root/party`` with an OSX route table."""
    home = root / party
    home.mkdir(parents=True, exist_ok=True)
    table = home / "routes.json"
    table.write_text(json.dumps({"self_party": [party], "route_table": routes}))
    data: dict[str, Any] = {
        "gateway": {"party_ids": [party], "drain_timeout_s": 2.0},
        "front": {"listen": f"127.0.0.1:{free_port()}"},
        "link": {"listen": f"127.0.0.1:{free_port()}", "insecure": True},
        "store": {"path": str(home / "fedgate.db"), "min_free_bytes": 0},
        "metrics": {"listen": ""},
        "routes": {"file": str(table), "poll_interval_s": 0.1},
        # These tests move arbitrary bytes; the audit chain (FATE objects only) has tests of its own.
        "audit": {"enabled": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def front_of(data: dict[str, Any]) -> int:
    return int(data["front"]["listen"].rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def running(config: FedgateConfig) -> AsyncIterator[Gateway]:
    """Run a gateway in this event loop for the duration of the block."""
    gateway = Gateway(config)
    task = asyncio.create_task(gateway.run(install_signals=False))
    ready = asyncio.create_task(gateway.wait_ready())
    done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises the start-up error
    try:
        yield gateway
    finally:
        gateway.request_stop()
        await asyncio.wait_for(task, 30)


def build(data: dict[str, Any]) -> FedgateConfig:
    return config_from_data(data)


class GatewayProcess:
    """A gateway as a child process (``python -m fedgate run``), for crash and restart tests."""

    def __init__(self, data: dict[str, Any], home: pathlib.Path) -> None:
        self.data = data
        self.config_file = home / "fedgate.toml"
        self.config_file.write_text(_toml(data))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "gateway.log"

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedgate", "run", "--config", str(self.config_file)],
                stdout=log, stderr=log, env=env,
            )
        wait_port(front_of(self.data), proc=self.proc, log=self.log)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)


def wait_port(port: int, *, proc: subprocess.Popen[bytes] | None = None, log: pathlib.Path | None = None,
              timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}: {log.read_text() if log else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@contextlib.contextmanager
def processes(*gateways: GatewayProcess) -> Iterator[tuple[GatewayProcess, ...]]:
    try:
        for gw in gateways:
            gw.start()
        yield gateways
    finally:
        for gw in gateways:
            gw.stop()


def doctor(config: pathlib.Path, *args: str, step_timeout: float = 3) -> subprocess.CompletedProcess[str]:
    """``fedgate doctor ARGS`` against a gateway config file, as a child process."""
    return subprocess.run([sys.executable, "-m", "fedgate", "doctor", *args, "--config", str(config),
                           "--timeout", f"{step_timeout:g}"], capture_output=True, text=True, timeout=120, check=False)


def _toml(data: dict[str, Any]) -> str:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
