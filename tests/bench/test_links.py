"""Both link emulators through real namespaces: delay, per-direction loss, rate (root).

The TUN emulator runs everywhere we are root; netem where the kernel has it.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

import pytest

from fedgate.bench import DirectionShape, LinkRow, LinkSettings, NetemLink, Sandbox, link_settings
from fedgate.bench._sandbox import run_cmd, wait_listening

from .conftest import LinkUnderTest, needs_root

pytestmark = [needs_root, pytest.mark.root]


def _serve(lut: LinkUnderTest, side: str, kind: str, port: int, idle: float) -> Any:
    addr = lut.link.addr_b if side == "b" else lut.link.addr_a
    proc = lut.start(side, [kind, "--listen", f"{addr}:{port}", "--idle", str(idle)])
    assert wait_listening(proc.pid, port, proto="udp", timeout=15)
    return proc


def _finish(proc: Any) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(("rtt_ms", "tick_s"), [(10.0, 0.0), (100.0, 0.0), (10.0, 0.004)])
def test_delay_within_2ms_of_the_setting(emulated_link: LinkUnderTest, rtt_ms: float, tick_s: float) -> None:
    emulated_link.link.shape(link_settings(LinkRow(rtt_ms, 0.0, 1000.0), tick_s=tick_s))
    port = emulated_link.next_port()
    echo = _serve(emulated_link, "b", "echo", port, idle=2.0)
    ping = emulated_link.probe(
        "a",
        ["ping", "--connect", f"{emulated_link.link.addr_b}:{port}", "--count", "20", "--interval", "0.01"],
    )
    _finish(echo)
    rtts = [r for r in ping["rtts_ms"] if r is not None]
    assert len(rtts) == 20
    assert abs(statistics.median(rtts) - rtt_ms) < 2.0
    # the emulator never delivers early, except by up to half a tick each way on a ticked link
    assert min(rtts) >= rtt_ms - 1000 * tick_s
    if tick_s and emulated_link.link.kind == "tun":
        # pings 10 ms apart fall on different phases of a 4 ms grid: the forwarder really rounds
        assert max(rtts) - min(rtts) >= 1.0, rtts


def _blast(
    lut: LinkUnderTest, src: str, count: int, size: int, pps: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    dst = "b" if src == "a" else "a"
    port = lut.next_port()
    sink = _serve(lut, dst, "sink", port, idle=1.0)
    dst_addr = lut.link.addr_b if dst == "b" else lut.link.addr_a
    lut.link.reset_stats()
    sent = lut.probe(
        src,
        [
            "blast",
            "--connect",
            f"{dst_addr}:{port}",
            "--count",
            str(count),
            "--size",
            str(size),
            "--pps",
            str(pps),
        ],
    )
    return sent, _finish(sink)


def test_loss_per_direction_within_statistical_bounds(emulated_link: LinkUnderTest) -> None:
    n = 10_000
    for src, key, p in (("a", "a_to_b", 0.05), ("b", "b_to_a", 0.20)):
        other = "b_to_a" if key == "a_to_b" else "a_to_b"
        lossy = DirectionShape(loss=p)
        emulated_link.link.shape(
            LinkSettings(a_to_b=lossy, b_to_a=DirectionShape())
            if key == "a_to_b"
            else LinkSettings(a_to_b=DirectionShape(), b_to_a=lossy)
        )
        sent, got = _blast(emulated_link, src, n, 100, 20_000)
        stats = emulated_link.link.stats()
        assert sent["packets"] == n
        lost = n - got["packets"]
        assert abs(lost - n * p) < 5 * math.sqrt(n * p * (1 - p))
        # the emulator's own counters agree with what the receiver saw
        if stats[key]["drop_loss"] is not None:  # the TUN emulator splits drops by cause
            if not any(stats["device_tx_dropped"].values()):
                assert stats[key]["packets_in"] == n
                assert stats[key]["drop_loss"] == lost
            assert stats[key]["drop_queue"] == 0
        else:
            assert stats[key]["drops"] == lost
        assert stats[other]["drops"] == 0  # loss is per direction


@pytest.mark.parametrize("tick_s", [0.0, 0.00025])
def test_rate_limit_respected(emulated_link: LinkUnderTest, tick_s: float) -> None:
    rate_mbit = 20.0
    emulated_link.link.shape(link_settings(LinkRow(20.0, 0.0, rate_mbit), tick_s=tick_s))
    size = 1200  # UDP payload; the IP packet is 28 bytes more
    sent, got = _blast(emulated_link, "a", 8000, size, 4000)  # about 39 Mbit/s offered for 2 s
    stats = emulated_link.link.stats()["a_to_b"]
    ip_mbit = got["packets"] * (size + 28) * 8 / got["seconds"] / 1e6
    assert ip_mbit <= rate_mbit * 1.03
    assert ip_mbit >= rate_mbit * 0.8  # loose: other work on the host may slow the forwarder
    assert stats["drops"] > 0
    if stats["drop_queue"] is not None:  # the TUN emulator splits drops by cause
        assert stats["drop_queue"] == stats["drops"]
        assert stats["queue_peak_bytes"] <= link_settings(LinkRow(20.0, 0.0, rate_mbit)).a_to_b.queue_bytes
    assert sent["packets"] == 8000


def test_netem_link_plumbing_carries_traffic_unshaped() -> None:
    """The veth half of NetemLink (namespaces, addresses, one segment per skb) works even without netem."""
    with Sandbox() as sandbox:
        link = NetemLink(sandbox)
        listen = f"{link.addr_b}:5001"
        server = sandbox.python("fedgate.bench.tcp_bulk", ["serve", "--listen", listen], netns=link.ns_b)
        assert wait_listening(server.pid, 5001, proto="tcp", timeout=15)
        client = sandbox.python(
            "fedgate.bench.tcp_bulk", ["send", "--connect", listen, "--duration", "0.3"], netns=link.ns_a
        )
        out, err = server.communicate(timeout=30)
        client.communicate(timeout=30)
        assert json.loads(out)["bytes"] > 0, err
        shown = run_cmd(["ip", "-n", link.ns_a, "-d", "link", "show", sandbox.device_name("a")])
        assert "gso_max_segs 1 " in shown
