"""The README's tour, as processes: two gateways, ``fedgate send`` / ``recv``, a kill -9 in between."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import urllib.request

from tests.proxy.gateways import GatewayProcess, free_port, front_of, gateway_data, processes

SESSION = "tour"
TOPIC = "tour-guest-9999-host-10000-model"


REPO = pathlib.Path(__file__).resolve().parents[2]


def fedgate(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "fedgate", *args], capture_output=True, timeout=120, check=False)


def test_send_a_file_to_the_other_party_survive_kill_9_and_receive_it(tmp_path: pathlib.Path) -> None:
    metrics_port = free_port()
    b = gateway_data(tmp_path, "10000", {})
    a = gateway_data(tmp_path, "9999", {"10000": {"default": [
        {"ip": "127.0.0.1", "port": front_of(b), "transport": "grpc"}]}},
        metrics={"listen": f"127.0.0.1:{metrics_port}"})
    gw_b = GatewayProcess(b, tmp_path / "10000")
    gw_a = GatewayProcess(a, tmp_path / "9999")
    data = os.urandom(5_000_000)
    (tmp_path / "model.bin").write_bytes(data)
    with processes(gw_b, gw_a):
        sent = fedgate("send", str(tmp_path / "model.bin"), "--from", "9999", "--to", "10000", "--session", SESSION,
                       "--topic", TOPIC, "--gateway", f"127.0.0.1:{front_of(a)}")
        assert sent.returncode == 0, sent.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert 'fedgate_messages_total{direction="outbound",peer="10000",route="grpc"} 1.0' in text
        gw_b.kill()  # acknowledged to the sender: must survive a crash of the receiving gateway
        gw_b.start()
        got = fedgate("recv", "--party", "10000", "--session", SESSION, "--topic", TOPIC,
                      "--gateway", f"127.0.0.1:{front_of(b)}", "-o", str(tmp_path / "got.bin"), "--timeout", "10")
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "got.bin").read_bytes() == data
        empty = fedgate("recv", "--party", "10000", "--session", SESSION, "--topic", TOPIC,
                        "--gateway", f"127.0.0.1:{front_of(b)}", "--timeout", "0.2")
        assert empty.returncode == 3 and b"nothing on topic" in empty.stderr


def test_send_to_an_unknown_party_fails_with_a_message_naming_it(tmp_path: pathlib.Path) -> None:
    a = gateway_data(tmp_path, "9999", {})
    (tmp_path / "x").write_bytes(b"x")
    with processes(GatewayProcess(a, tmp_path / "9999")):
        sent = fedgate("send", str(tmp_path / "x"), "--from", "9999", "--to", "31337", "--session", "s",
                       "--topic", "t", "--gateway", f"127.0.0.1:{front_of(a)}")
    assert sent.returncode == 1
    assert b"NOT_FOUND" in sent.stderr and b"31337" in sent.stderr


def test_config_check_names_the_file_and_dotted_path(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[front]\nlisten = "127.0.0.1:9370"\nmax_pop_wait = 3\n')
    out = fedgate("config", "check", str(bad))
    assert out.returncode == 2
    assert f"{bad}:front".encode() in out.stderr and b"max_pop_wait" in out.stderr
    good = fedgate("config", "check", str(REPO / "conf" / "fedgate.toml"))
    assert good.returncode == 0, good.stderr
