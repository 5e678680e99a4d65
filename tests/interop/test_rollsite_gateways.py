"""The real EggRoll 3.0.0 rollsite client (stream mode) through two fedgate gateways.

EggRoll's own ``RollSite.push_bytes`` streams an object into gateway A (party 9999) addressed to
party 10000; A relays it to gateway B, which stores the packets; the test then drains them from B
with ``DataTransferService.pull`` and decodes them with EggRoll's own bin-batch reader
(tests/interop/drivers/rollsite.py). No EggRoll cluster runs here, so B's delivery into an
EggRoll store (putBatch / TransferService.send) is not covered.
"""

from __future__ import annotations

import pathlib
import signal

import pytest

from tests.interop.harness import K_DRIVERS, DriverRun, Gateway, gateway_mesh, run_drivers

pytestmark = pytest.mark.interop

K_OBJECT_BYTES = 1_250_000  # bytes of the blob in the object: 13 chunks of 100,000 bytes, 2 streams
K_DRIVER_TIMEOUT = 120.0  # seconds


def _argv(action: str, port: int, session: str, *extra: str) -> list[str]:
    return [
        str(K_DRIVERS / "rollsite.py"), action,
        "--port", str(port),
        "--session", session,
        "--name", "model_weights",
        "--tag", "iter-0",
        "--src-role", "guest", "--src-party", "9999",
        "--dst-role", "host", "--dst-party", "10000",
        "--size", str(K_OBJECT_BYTES),
        "--seed", "7",
        *extra,
    ]  # fmt: skip


def _check(runs: dict[str, DriverRun], gws: dict[str, Gateway]) -> None:
    bad = [r.describe() for r in runs.values() if not r.ok]
    assert not bad, "\n\n".join([*bad, *(gw.log_tail() for gw in gws.values())])


@pytest.mark.parametrize("restart", [False, True], ids=["direct", "restart-before-pull"])
def test_rollsite_push_bytes_relayed_and_stored(
    eggroll_python: pathlib.Path, tmp_path: pathlib.Path, restart: bool
) -> None:
    session = f"rs-{'restart' if restart else 'direct'}"
    with gateway_mesh(tmp_path, ["9999", "10000"], transport="grpc") as gws:
        pushed = run_drivers(
            eggroll_python,
            {"push": _argv("push", gws["9999"].front_port, session)},
            workdir=tmp_path / "push",
            timeout=K_DRIVER_TIMEOUT,
        )
        _check(pushed, gws)
        if restart:
            gws["10000"].kill(signal.SIGKILL)
            gws["10000"].start()
        pulled = run_drivers(
            eggroll_python,
            {"pull": _argv("pull", gws["10000"].front_port, session)},
            workdir=tmp_path / "pull",
            timeout=K_DRIVER_TIMEOUT,
        )
        _check(pulled, gws)
        result = pulled["pull"].result
        assert result["bytes"] == result["want_bytes"] > K_OBJECT_BYTES
        # EggRoll's framing, as relayed: 100,000-byte chunks (+ a small bin-batch header), at most
        # 10 packets per push stream, the last packet marked finish_partition.
        assert result["chunks"] == result["bytes"] // 100_000 + 1
        assert result["max_body"] <= 100_000 + 64
        assert result["streams"] == 2
        assert result["data_types"] == ["object"]
        assert result["last_stage"] == "finish_partition"
        assert result["seqs"] == list(range(1, result["packets"] + 1))
        assert result["dst"] == ["host:10000"]


def test_rollsite_push_of_non_fate_bytes_fails_the_eggroll_call(
    eggroll_python: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Bytes that are not a FATE object are refused by the audit chain; eggroll's push must fail.

    Not silent is the point: the client sees an RPC error (fate-wire.md: clients ignore ``code``).
    """
    with gateway_mesh(tmp_path, ["9999", "10000"], transport="grpc") as gws:
        pushed = run_drivers(
            eggroll_python,
            {"push": _argv("push", gws["9999"].front_port, "rs-raw", "--raw")},
            workdir=tmp_path / "push",
            timeout=K_DRIVER_TIMEOUT,
        )
        push = pushed["push"]
        assert push.returncode == 1 and "RpcError" in push.result["error"], push.describe()
        pulled = run_drivers(
            eggroll_python,
            {"pull": _argv("pull", gws["10000"].front_port, "rs-raw", "--raw")},
            workdir=tmp_path / "pull",
            timeout=K_DRIVER_TIMEOUT,
        )
        # The object never arrives whole: its last packet (finish_partition) was refused. Packets
        # relayed before the audit could decide may sit in the destination queue (streaming).
        pull = pulled["pull"]
        assert not pull.ok and pull.result.get("last_stage") != "finish_partition", pull.describe()
