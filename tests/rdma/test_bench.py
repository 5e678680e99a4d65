"""The benchmark script's TCP baseline and report on 127.0.0.1 (the RDMA side runs in the QEMU guest)."""

from __future__ import annotations

import socket

import pytest

from fedgate.rdma.bench import Result, main, report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_tcp_baseline_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    tcp_port = _free_port()  # the bench puts tcp on PORT+1
    args = ["local", "--listen", f"127.0.0.1:{tcp_port - 1}", "--transports", "tcp"]
    assert main([*args, "--sizes", "1024,65536", "--seconds", "0.05", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert "1 KiB       tcp" in out and "64 KiB       tcp" in out
    assert "4.9-6.3 GB/s" in out


def test_report_shows_rdma_as_ratios_of_tcp() -> None:
    text = report([Result("rdma", 1 << 20, 5000.0, 5.0, 25.0), Result("tcp", 1 << 20, 1000.0, 1.0, 100.0)])
    assert "bandwidth x5.00, latency 25% of tcp" in text


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["client"])  # no --connect
    with pytest.raises(SystemExit):
        main(["local", "--sizes", "8"])
