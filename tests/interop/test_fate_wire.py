"""What the real FATE 2.2.0 client sends in OSX queue mode, pinned against an in-memory broker.

These tests need no gateway: three real FATE parties (guest, host, arbiter) share one recording
broker (tests/interop/memory_broker.py), exchange Paillier keys, encrypted and plain tensors and
objects over 1 MiB, and the recorded calls are checked against docs in /shared/fate-wire.md.
If pyfate ever changes its wire behaviour, these fail first and say what changed.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Sequence

import pytest

from tests.interop.harness import DriverRun, fate_party_argv, run_drivers
from tests.interop.memory_broker import BrokerCall, MemoryBroker

pytestmark = pytest.mark.interop

K_PARTIES = (("guest", "9999"), ("host", "10000"), ("arbiter", "10001"))
K_ITERATIONS = 2
K_DRIVER_TIMEOUT = 120.0  # seconds for all drivers of one test (the broker caps pops at 60 s)
K_FATE_POP_TIMEOUT_MS = 36_000_000  # what pyfate asks for in PopInbound.timeout


def _assert_all_ok(runs: dict[str, DriverRun]) -> None:
    bad = [r.describe() for r in runs.values() if not r.ok]
    assert not bad, "driver(s) failed:\n" + "\n\n".join(bad)


def _triad(pyfate: pathlib.Path, tmp: pathlib.Path, port: int, session: str) -> dict[str, DriverRun]:
    commands = {
        role: fate_party_argv(
            role=role,
            party_id=pid,
            parties=K_PARTIES,
            port=port,
            session=session,
            data_dir=tmp / f"data-{role}",
            iterations=K_ITERATIONS,
        )
        for role, pid in K_PARTIES
    }
    return run_drivers(pyfate, commands, workdir=tmp, timeout=K_DRIVER_TIMEOUT)


def test_triad_exchanges_keys_tensors_and_big_objects(
    pyfate_python: pathlib.Path, memory_broker: MemoryBroker, tmp_path: pathlib.Path
) -> None:
    runs = _triad(pyfate_python, tmp_path, memory_broker.port, "wire-triad")
    _assert_all_ok(runs)
    # Every receiver really compared something: keys, 2 tensors, the sum, the big object, barrier.
    assert runs["guest"].result["checks"] == 1 + 2 * K_ITERATIONS + 2
    assert runs["host"].result["checks"] == 1 + 2 * K_ITERATIONS + 2
    assert runs["arbiter"].result["checks"] == K_ITERATIONS + 2
    assert memory_broker.queues.depth() == 0, "every pushed message was popped"
    _check_wire(memory_broker.calls(), "wire-triad")


def _check_wire(calls: Sequence[BrokerCall], session: str) -> None:
    ids = {pid for _, pid in K_PARTIES}
    role_of = {pid: role for role, pid in K_PARTIES}
    pushes = [c for c in calls if c.method == "push"]
    pops = [c for c in calls if c.method == "pop"]
    releases = [c for c in calls if c.method == "release"]
    assert pushes and pops and releases
    assert not [c for c in calls if c.method == "peek"], "pyfate 2.2.0 never peeks"

    topic_re = re.compile(rf"^{session}-(\w+)-(\d+)-(\w+)-(\d+)-(.+)$")
    for c in pushes:
        md = c.metadata
        # Headers of a push (fate-wire.md section 2).
        assert md["x-ptp-session-id"] == session
        assert md["x-ptp-tech-provider-code"] == "FATE"
        assert re.fullmatch(r"\d+_\d+", md["x-ptp-trace-id"]), md["x-ptp-trace-id"]
        assert "x-ptp-source-node-id" not in md
        m = topic_re.match(c.topic)
        assert m, c.topic
        src_role, src, dst_role, dst, name = m.groups()
        assert md["x-ptp-from-node-id"] == src and md["x-ptp-target-node-id"] == dst
        assert role_of[src] == src_role and role_of[dst] == dst_role
        # The JSON head: message_id is the name, app_id the destination, correlation_id the tag.
        assert c.head["app_id"] == dst
        assert c.head["correlation_id"].startswith("default")
        assert c.msg_id == "", "pyfate leaves Message.msgId empty"
        assert c.push_metadata_field == {}, "pyfate leaves PushInbound.metadata empty"
        assert c.deadline_s is None, "pushes carry no gRPC deadline"
        if c.head["content_type"] == "text/plain":
            assert name == c.head["message_id"]
        else:
            # A table partition: topic {name}-{partition}, JSON list of hex key/value pairs.
            assert c.head["content_type"] == "application/json"
            base, _, part = name.rpartition("-")
            assert base == c.head["message_id"] and part.isdigit()
            header = json.loads(c.head["headers"])
            assert set(header) == {"partition_size", "partitions", "message_key"}

    for c in pops:
        md = c.metadata
        assert md["x-ptp-session-id"] == session
        assert md["x-ptp-from-node-id"] in ids, "pop names its OWN party as from-node"
        assert "x-ptp-target-node-id" not in md
        m = topic_re.match(c.topic)
        assert m and m.group(4) == md["x-ptp-from-node-id"], "a party pops the queues addressed to it"
        assert c.timeout_ms == K_FATE_POP_TIMEOUT_MS
        assert c.deadline_s is None, "pops carry no gRPC deadline"

    for c in releases:
        assert c.topic == "", "release at session end is session-wide"
        assert c.metadata["x-ptp-session-id"] == session
        assert "x-ptp-from-node-id" not in c.metadata and "x-ptp-target-node-id" not in c.metadata
    assert len(releases) == len(K_PARTIES), "each party releases once (ctx.destroy)"

    # The split path: an object over 1 MiB travels as a 4-partition table, then a small header.
    split = [c for c in pushes if "__table_persistent_split__" in c.topic]
    assert {c.topic.rsplit("-", 1)[1] for c in split} == {"0", "1", "2", "3"}
    assert max(c.payload_size for c in split) > 1 << 20
    bigs = [c for c in pushes if c.topic.endswith("-big")]
    assert len(bigs) == K_ITERATIONS
    assert all(c.body_size == 33 for c in bigs), "split header: mode byte + !QIIIIII"


def test_oneway_send_then_receive_in_separate_processes(
    pyfate_python: pathlib.Path, memory_broker: MemoryBroker, tmp_path: pathlib.Path
) -> None:
    parties = (("guest", "9999"), ("host", "10000"))

    def argv(role: str, pid: str, phase: str) -> list[str]:
        return fate_party_argv(
            role=role,
            party_id=pid,
            parties=parties,
            port=memory_broker.port,
            session="wire-oneway",
            data_dir=tmp_path / f"data-{role}",
            scenario="oneway",
            phase=phase,
            iterations=K_ITERATIONS,
            extra=["--no-destroy"],
        )

    sent = run_drivers(
        pyfate_python, {"guest": argv("guest", "9999", "send")}, workdir=tmp_path, timeout=K_DRIVER_TIMEOUT
    )
    _assert_all_ok(sent)
    assert memory_broker.queues.depth() > 0
    received = run_drivers(
        pyfate_python, {"host": argv("host", "10000", "recv")}, workdir=tmp_path, timeout=K_DRIVER_TIMEOUT
    )
    _assert_all_ok(received)
    assert received["host"].result["checks"] == 3 * K_ITERATIONS
    assert memory_broker.queues.depth() == 0
