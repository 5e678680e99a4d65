"""The real FATE 2.2.0 client through fedgate gateways (OSX queue mode), one gateway per party.

Each party's FATE process talks only to its own gateway; gateways run as separate processes on
127.0.0.1 and forward to each other. The receivers check every object they get against what the
sender must have sent (tests/interop/drivers/fate_party.py), and a gateway restart between push
and pop must lose nothing.
"""

from __future__ import annotations

import pathlib
import signal

import pytest

from tests.interop.harness import DriverRun, Gateway, fate_party_argv, gateway_mesh, run_drivers

pytestmark = pytest.mark.interop

K_TRIAD = (("guest", "9999"), ("host", "10000"), ("arbiter", "10001"))
K_PAIR = (("guest", "9999"), ("host", "10000"))
K_ITERATIONS = 3
K_DRIVER_TIMEOUT = 120.0  # seconds for all drivers of one step (a lost message: LookupError after 90 s)


def _failures(runs: dict[str, DriverRun], gateways: dict[str, Gateway]) -> str:
    bad = [r.describe() for r in runs.values() if not r.ok]
    if not bad:
        return ""
    return "\n\n".join([*bad, *(gw.log_tail() for gw in gateways.values())])


@pytest.mark.parametrize("transport", ["grpc", "tcp"])
def test_guest_host_arbiter_through_three_gateways(
    pyfate_python: pathlib.Path, tmp_path: pathlib.Path, transport: str
) -> None:
    with gateway_mesh(tmp_path, [pid for _, pid in K_TRIAD], transport=transport) as gws:
        commands = {
            role: fate_party_argv(
                role=role,
                party_id=pid,
                parties=K_TRIAD,
                port=gws[pid].front_port,
                session="gw-triad",
                data_dir=tmp_path / f"data-{role}",
                iterations=K_ITERATIONS,
            )
            for role, pid in K_TRIAD
        }
        runs = run_drivers(pyfate_python, commands, workdir=tmp_path / "drivers", timeout=K_DRIVER_TIMEOUT)
        assert not _failures(runs, gws), _failures(runs, gws)
        assert runs["guest"].result["checks"] == 1 + 2 * K_ITERATIONS + 2
        assert runs["host"].result["checks"] == 1 + 2 * K_ITERATIONS + 2
        assert runs["arbiter"].result["checks"] == K_ITERATIONS + 2
        for gw in gws.values():
            assert gw.proc is not None and gw.proc.poll() is None, gw.log_tail()


@pytest.mark.parametrize(
    ("transport", "sig", "peer_down"),
    [
        ("grpc", signal.SIGKILL, False),
        ("grpc", signal.SIGTERM, False),
        ("tcp", signal.SIGKILL, False),
        ("tcp", signal.SIGKILL, True),
    ],
    ids=["grpc-kill-9", "grpc-sigterm", "tcp-kill-9", "tcp-kill-9-peer-down"],
)
def test_gateway_restart_between_push_and_pop_loses_nothing(
    pyfate_python: pathlib.Path, tmp_path: pathlib.Path, transport: str, sig: signal.Signals, peer_down: bool
) -> None:
    """The guest's pushes are acknowledged, then both gateways die and come back; the host gets all.

    Over ``grpc`` the messages sit in the host's gateway when the pushes return. Over a link
    transport a push returns once the message is in the guest gateway's outbox; with ``peer_down``
    the host's gateway is down while the guest sends, so everything is still in that outbox when
    the guest's gateway is killed.
    """

    def argv(role: str, pid: str, phase: str, gws: dict[str, Gateway]) -> list[str]:
        return fate_party_argv(
            role=role,
            party_id=pid,
            parties=K_PAIR,
            port=gws[pid].front_port,
            session=f"gw-restart-{transport}-{sig.name}-{peer_down}",
            data_dir=tmp_path / f"data-{role}",
            scenario="oneway",
            phase=phase,
            iterations=K_ITERATIONS,
            extra=["--no-destroy"],
        )

    with gateway_mesh(tmp_path, [pid for _, pid in K_PAIR], transport=transport) as gws:
        if peer_down:
            gws["10000"].kill(signal.SIGKILL)
        sent = run_drivers(
            pyfate_python,
            {"guest": argv("guest", "9999", "send", gws)},
            workdir=tmp_path / "send",
            timeout=K_DRIVER_TIMEOUT,
        )
        assert not _failures(sent, gws), _failures(sent, gws)
        for gw in gws.values():
            gw.kill(sig)
        for gw in gws.values():
            gw.start()
        received = run_drivers(
            pyfate_python,
            {"host": argv("host", "10000", "recv", gws)},
            workdir=tmp_path / "recv",
            timeout=K_DRIVER_TIMEOUT,
        )
        assert not _failures(received, gws), _failures(received, gws)
        assert received["host"].result["checks"] == 3 * K_ITERATIONS


def test_push_without_route_fails_the_fate_call(pyfate_python: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """pyfate ignores ``code`` on push: a push the gateway cannot deliver must fail the RPC itself."""
    with gateway_mesh(tmp_path, ["9999"]) as gws:  # no route to party 10000
        argv = fate_party_argv(
            role="guest",
            party_id="9999",
            parties=K_PAIR,
            port=gws["9999"].front_port,
            session="gw-noroute",
            data_dir=tmp_path / "data-guest",
            scenario="oneway",
            phase="send",
            iterations=1,
            extra=["--no-destroy"],
        )
        runs = run_drivers(pyfate_python, {"guest": argv}, workdir=tmp_path / "d", timeout=K_DRIVER_TIMEOUT)
        guest = runs["guest"]
        assert guest.returncode == 1 and not guest.result["ok"], guest.describe()
        assert "_InactiveRpcError" in guest.result["error"], guest.describe()
        assert "10000" in guest.result["error"], "the status names the party without a route"


def test_expired_pop_becomes_fate_lookup_error(pyfate_python: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A pop that outlives the gateway's cap is answered E0000000601, which pyfate raises as LookupError."""
    with gateway_mesh(tmp_path, ["10000"], max_pop_wait_s=1.0) as gws:  # nobody ever sends
        argv = fate_party_argv(
            role="host",
            party_id="10000",
            parties=K_PAIR,
            port=gws["10000"].front_port,
            session="gw-expired",
            data_dir=tmp_path / "data-host",
            scenario="oneway",
            phase="recv",
            iterations=1,
            extra=["--no-destroy"],
        )
        runs = run_drivers(pyfate_python, {"host": argv}, workdir=tmp_path / "d", timeout=K_DRIVER_TIMEOUT)
        host = runs["host"]
        assert host.returncode == 1, host.describe()
        assert host.result["error"].startswith("LookupError"), host.describe()
        assert "E0000000601" in host.result["error"], host.describe()
