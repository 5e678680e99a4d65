"""The transport registry and the kernel TCP runner on loopback."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys

import pytest

from fedgate.bench import availability, build_transports, select_transports
from fedgate.bench.tcp_bulk import parse_tcp_info
from fedgate.errors import UnknownPluginError


def test_registry_names_and_contract_argv() -> None:
    reg = build_transports()
    assert list(reg) == ["kernel-cubic", "kernel-bbr", "fedgate-quic"]
    bbr = reg["kernel-bbr"]
    assert bbr.server_argv("10.0.0.2:5000")[-4:] == [
        "fedgate.bench.tcp_bulk",
        "serve",
        "--listen",
        "10.0.0.2:5000",
    ]
    assert bbr.client_argv("10.0.0.2:5000", duration=15)[-7:] == [
        "send", "--connect", "10.0.0.2:5000", "--duration", "15", "--cc", "bbr",
    ]  # fmt: skip
    quic = reg["fedgate-quic"]
    assert quic.module == "fedgate.congestion.quic_bulk" and "--cc" not in quic.client_argv("h:1", duration=1)
    assert 0.9 < quic.payload_share(1500) < bbr.payload_share(1500) < 1.0


def test_unknown_transport_lists_valid_names() -> None:
    with pytest.raises(UnknownPluginError) as info:
        select_transports(["kernel-bbr", "kernel-vegas"], build_transports())
    assert "kernel-vegas" in str(info.value) and "kernel-cubic" in str(info.value)


def test_availability() -> None:
    reg = build_transports()
    assert availability(reg["kernel-cubic"]) is None
    why = availability(reg["fedgate-quic"])
    assert why is None or why.startswith("module fedgate.congestion.quic_bulk cannot be imported")


def test_parse_tcp_info_reads_fields_it_has_room_for() -> None:
    raw = bytearray(232)
    struct.pack_into("=I", raw, 100, 7)  # total_retrans
    struct.pack_into("=Q", raw, 120, 123456)  # bytes_acked
    struct.pack_into("=I", raw, 156, 99)  # data_segs_out
    info = parse_tcp_info(bytes(raw))
    assert (info["total_retrans"], info["bytes_acked"], info["data_segs_out"]) == (7, 123456, 99)
    assert "bytes_retrans" not in parse_tcp_info(bytes(raw[:200]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("cc", ["cubic", "bbr"])
def test_tcp_bulk_on_loopback(cc: str) -> None:
    port = _free_port()
    mod = [sys.executable, "-m", "fedgate.bench.tcp_bulk"]
    server = subprocess.Popen(
        [*mod, "serve", "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True
    )
    try:
        client = subprocess.run(
            [*mod, "send", "--connect", f"127.0.0.1:{port}", "--duration", "0.5", "--cc", cc],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        out, _ = server.communicate(timeout=30)
    finally:
        server.kill()
        server.wait()
    srv, cli = json.loads(out), json.loads(client.stdout)
    assert srv["bytes"] > 0 and 0.45 <= srv["seconds"] <= 0.6
    assert cli["cc"] == cc
    assert cli["packets_sent"] > 0 and cli["packets_lost"] >= 0
    # the receiver cannot have read more than the sender had acknowledged by the end
    assert cli["bytes_sent"] > 0
