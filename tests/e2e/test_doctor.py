"""``fedgate doctor PARTY`` explains reachability step by step, against real gateways."""

from __future__ import annotations

import pathlib

from tests.proxy.gateways import GatewayProcess, doctor, free_port, front_of, gateway_data, processes


def test_doctor_walks_the_route_and_every_endpoint(tmp_path: pathlib.Path) -> None:
    b = gateway_data(tmp_path, "10000", {"9999": {"default": [{"ip": "127.0.0.1", "port": 1, "transport": "tcp"}]}})
    b_link = int(b["link"]["listen"].rsplit(":", 1)[1])
    a = gateway_data(tmp_path, "9999", {
        "10000": {"default": [{"ip": "127.0.0.1", "port": b_link, "transport": "tcp"},
                              {"ip": "127.0.0.1", "port": free_port(), "transport": "tcp"}],
                  "fateflow": [{"ip": "127.0.0.1", "port": front_of(b), "transport": "grpc"}]},
    })
    gw_a = GatewayProcess(a, tmp_path / "9999")  # writes A's config file; A itself need not run
    with processes(GatewayProcess(b, tmp_path / "10000")):
        out = doctor(gw_a.config_file, "10000")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "party '10000': found" in out.stdout
        assert "[ok] handshake" in out.stdout and "[ok] clock" in out.stdout
        assert "[FAIL] tcp" in out.stdout  # the second endpoint: nothing listens there
        assert "1 of 2 endpoint(s) of party 10000 reachable" in out.stdout
        flow = doctor(gw_a.config_file, "10000", "--role", "fateflow")
        assert flow.returncode == 0 and "[ok] grpc" in flow.stdout, flow.stdout + flow.stderr
    down = doctor(gw_a.config_file, "10000")
    assert down.returncode == 1 and "0 of 2" in down.stdout
    missing = doctor(gw_a.config_file, "4242")
    assert missing.returncode == 1 and "no fallback" in missing.stdout
