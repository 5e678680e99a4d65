"""The bulk tool's contract with the benchmark harness, run as the harness runs it (two processes)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from fedgate.congestion.quic_bulk import main

pytestmark = pytest.mark.timeout(90)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("connections", [1, 2])
def test_serve_and_send_print_one_json_line_each(connections: int) -> None:
    port = _free_udp_port()
    listen = f"127.0.0.1:{port}"
    module = [sys.executable, "-m", "fedgate.congestion.quic_bulk"]
    many = ["--connections", str(connections)]
    server = subprocess.Popen([*module, "serve", "--listen", listen, *many], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        sender = subprocess.run(
            [*module, "send", "--connect", listen, "--duration", "2", "--cc", "newreno", *many],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        out, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert sender.returncode == 0, sender.stderr
    srv_lines = [ln for ln in out.splitlines() if ln.strip()]
    cli_lines = [ln for ln in sender.stdout.splitlines() if ln.strip()]
    assert len(srv_lines) == 1 and len(cli_lines) == 1
    srv, cli = json.loads(srv_lines[0]), json.loads(cli_lines[0])
    assert "error" not in srv
    assert srv["seconds"] == pytest.approx(2.0, abs=0.05)
    assert srv["bytes"] > 100_000
    assert cli["cc"] == "newreno"
    assert cli["packets_sent"] > 0 and cli["packets_lost"] >= 0
    assert cli["bytes_sent"] > 0
    assert srv["cpu_share"] > 0 and cli["cpu_share"] > 0
    # the receiver counted no more than the sender handed to QUIC
    assert srv["bytes"] <= cli["stream_bytes"]
    if connections > 1:
        assert srv["connections"] == connections
        assert cli["connections"] == connections
        assert len(cli["per_connection"]) == connections
        assert sum(p["packets_sent"] for p in cli["per_connection"]) == cli["packets_sent"]


def test_unknown_controller_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "--connect", "127.0.0.1:9", "--duration", "1", "--cc", "cubic"]) == 2
    out = capsys.readouterr()
    assert "valid names: ltbbr, newreno" in json.loads(out.out)["error"]
