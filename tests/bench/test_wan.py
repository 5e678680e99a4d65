"""The ``fedgate bench wan`` harness end to end on one short row, and its cleanup on signals (root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgate.bench import wan_main

from .conftest import needs_root, our_netns

pytestmark = [needs_root, pytest.mark.root]


def test_list_transports(capsys: pytest.CaptureFixture[str]) -> None:
    assert wan_main(["--list-transports"]) == 0
    out = capsys.readouterr().out
    assert "kernel-cubic" in out and "kernel-bbr" in out and "fedgate-quic" in out


def test_bad_row_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert wan_main(["--row", "80:abc"]) == 2
    assert "--row" in capsys.readouterr().err


@pytest.mark.parametrize("tick", ["-1", "20000"])
def test_a_delivery_tick_out_of_range_is_a_usage_error(tick: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert wan_main(["--emu-tick-us", tick, "--transports", "kernel-cubic"]) == 2
    assert "--emu-tick-us" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_one_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "wan"
    argv = ["--row", "20:0.5:20", "--duration", "2", "--calibrate", "1", "--no-progress", "--out", str(out)]
    argv += ["--transports", "kernel-cubic,kernel-bbr,fedgate-quic"]
    status = wan_main(argv)
    text = capsys.readouterr()
    assert status == 0, text.err
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["emulator"]["kind"] in ("tun", "netem")
    if doc["emulator"]["kind"] == "tun":
        assert doc["emulator"]["ceiling"]["ip_mbit"] > 0
        assert doc["emulator"]["delivery_tick"] == "250 us"
    assert doc["rtt_checks"][0]["received"] > 0
    ran = [r for r in doc["results"]]
    assert [r["transport"] for r in ran] == doc["transports"]["run"]
    assert {"kernel-cubic", "kernel-bbr"} <= set(doc["transports"]["run"])
    if "fedgate-quic" not in doc["transports"]["run"]:
        assert "fedgate-quic" in doc["transports"]["unavailable"]
        assert "unavailable" in text.err
    for r in ran:
        assert r["error"] == ""
        assert 0 < r["goodput_mbit"] <= r["limit_mbit"] * 1.02
        data = r["emulator"]["a_to_b"]
        assert data["packets_in"] > 0 and data["bytes_out"] * 8 / 1e6 <= 20 * (r["emulator"]["wall_s"] + 0.1)
    assert "kernel-bbr" in text.out and "goodput" in text.out
    assert our_netns(os.getpid()) == []


def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_cleans_up_namespaces_and_processes(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "wan"
    argv = [sys.executable, "-m", "fedgate.bench.wan", "--row", "20:0:20", "--duration", "60"]
    argv += [
        "--calibrate",
        "0",
        "--transports",
        "kernel-cubic",
        "--no-progress",
        "--no-plot",
        "--out",
        str(out),
    ]
    # A test run started in the background (a CI script's `cmd &`) inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: give the harness the default disposition a terminal has.
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 30
        kids: set[int] = set()
        while time.monotonic() < deadline:  # wait until the transfer runs: forwarder + server + client
            kids = _children(proc.pid)
            if len(kids) >= 3 and len(our_netns(proc.pid)) == 2:
                break
            time.sleep(0.1)
        assert len(kids) >= 3, "the harness did not start its transfer"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "interrupted" in err
    assert our_netns(proc.pid) == []
    assert not {k for k in kids if Path(f"/proc/{k}").exists()}
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["interrupted"]
