"""Doctor probe against a live listener on 127.0.0.1 over mTLS: every step, and where each failure shows."""

from __future__ import annotations

import asyncio
import pathlib
import socket

import pytest

from fedgate.proxy.certs import client_context, issue_parties, party_files, server_context
from fedgate.proxy.link_core import LinkParams
from fedgate.proxy.link_doctor import diagnose, format_steps, main
from fedgate.proxy.link_listener import LinkListener
from fedgate.proxy.link_sender import LinkSender, carrier_dial
from fedgate.proxy.tcp_carrier import TcpCarrier
from fedgate.proxy.testing import MemoryInbox, MemoryOutbox


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("certs")
    issue_parties(d, ["1", "2"])
    return d


def test_all_steps_pass_and_the_probe_leaves_the_live_link_alone(certs: pathlib.Path) -> None:
    async def main_() -> None:
        carrier = TcpCarrier()
        listener = LinkListener(params=LinkParams("2"), inbox=MemoryInbox(), allow=lambda p: p == "1")
        server = await carrier.listen("127.0.0.1", 0, tls=server_context(*party_files(certs, "2")),
                                      handler=listener.handle)
        client_tls = client_context(*party_files(certs, "1"))
        sender = LinkSender(peer="2", params=LinkParams("1"), outbox=MemoryOutbox(), dial=carrier_dial(
            carrier.connect, "127.0.0.1", server.port, tls=client_tls, server_hostname=None, timeout=5.0))
        task = asyncio.create_task(sender.run())
        async with asyncio.timeout(10):
            while not sender.statistics().connected:
                await asyncio.sleep(0.01)
        steps = await diagnose(host="localhost", port=server.port, party="2", local_party="1", tls=client_tls)
        text = format_steps(steps)
        assert [s.name for s in steps] == ["dns", "tcp", "connect", "identity", "handshake", "rtt", "clock"], text
        assert all(s.ok for s in steps), text
        assert "party 2 speaks link version 1" in text
        await asyncio.sleep(0.05)
        stats = sender.statistics()
        assert stats.connected and stats.reconnects == 0  # the probe did not replace the live link
        assert stats.clock_skew_s is not None and abs(stats.clock_skew_s) < 5
        await sender.aclose()
        task.cancel()
        await server.aclose()

    asyncio.run(main_())


def test_wrong_party_stops_at_identity(certs: pathlib.Path) -> None:
    async def main_() -> None:
        listener = LinkListener(params=LinkParams("2"), inbox=MemoryInbox(), allow=lambda p: True)
        server = await TcpCarrier().listen("127.0.0.1", 0, tls=server_context(*party_files(certs, "2")),
                                           handler=listener.handle)
        steps = await diagnose(host="127.0.0.1", port=server.port, party="3", local_party="1",
                               tls=client_context(*party_files(certs, "1")))
        assert steps[-1].name == "identity" and not steps[-1].ok
        assert "certificate says party '2', but the route says '3'" in steps[-1].detail
        await server.aclose()

    asyncio.run(main_())


def test_refused_party_fails_the_handshake_step(certs: pathlib.Path) -> None:
    async def main_() -> None:
        listener = LinkListener(params=LinkParams("2"), inbox=MemoryInbox(), allow=lambda p: False)
        server = await TcpCarrier().listen("127.0.0.1", 0, tls=None, handler=listener.handle)
        steps = await diagnose(host="127.0.0.1", port=server.port, party="2", local_party="1", tls=None)
        assert [s.name for s in steps][-1] == "handshake" and not steps[-1].ok
        assert "not allowed" in steps[-1].detail
        await server.aclose()

    asyncio.run(main_())


def test_closed_port_fails_at_tcp_and_cli_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main([f"127.0.0.1:{port}", "--party", "2", "--local-party", "1", "--timeout", "2"]) == 1
    out = capsys.readouterr()
    assert "ok   dns" in out.out and "FAIL tcp" in out.out and "NOT reachable" in out.err
