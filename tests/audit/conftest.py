"""Shared fixtures of the audit tests: real FATE payloads, hand-built hostile pickles, envelopes.

``fate_payloads`` runs ``gen_fate_payloads.py`` once per session under the pyfate test virtualenv
(``.test-venvs/pyfate``, built by ``make interop-venv``). When that venv is absent the tests that
need it skip locally with the reason, and FAIL when the ``CI`` environment variable is set.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from fedgate.audit.bench import fate_key_pickle
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.protos import osx_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
K_PYFATE = pathlib.Path(os.environ.get("FEDGATE_INTEROP_VENVS", ROOT / ".test-venvs")) / "pyfate"
K_EGGROLL = K_PYFATE.with_name("eggroll")
K_GENERATOR = pathlib.Path(__file__).with_name("gen_fate_payloads.py")
K_ROLLSITE_GENERATOR = pathlib.Path(__file__).with_name("gen_rollsite_packets.py")


@dataclass(frozen=True)
class FatePayload:
    """One PushInbound payload the real FATE guest sent."""

    object: str
    envelope: Envelope
    content_type: str


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"real FATE payloads unavailable under CI: {reason}")
    pytest.skip(f"real FATE payloads unavailable: {reason}")


def _venv_python(venv: pathlib.Path) -> pathlib.Path:
    python = venv / "bin" / "python"
    failed = venv.with_name(f"{venv.name}.failed")
    if not python.exists():
        why = failed.read_text().strip() if failed.exists() else "run `make interop-venv`"
        _unavailable(f"{python} is missing ({why})")
    return python


def _run_generator(python: pathlib.Path, script: pathlib.Path, *args: pathlib.Path) -> None:
    """Run a generator; one retry, because FATE's standalone computing (forked workers next to a gRPC
    channel) now and then loses a worker on a loaded machine (BrokenProcessPool)."""
    env = {**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "true", "GRPC_POLL_STRATEGY": "poll"}
    failures = []
    for _ in range(2):
        proc = subprocess.run(
            [str(python), str(script), *map(str, args)], capture_output=True, text=True, timeout=240, env=env
        )
        if proc.returncode == 0 and "RESULT " in proc.stdout:
            return
        failures.append(f"exit {proc.returncode}:\n{proc.stdout[-1000:]}\n{proc.stderr[-3000:]}")
        for stale in args[-1].glob("*"):
            stale.unlink()
    pytest.fail(f"{script.name} failed twice:\n" + "\n---\n".join(failures))


@pytest.fixture(scope="session")
def fate_payloads(tmp_path_factory: pytest.TempPathFactory) -> list[FatePayload]:
    python = _venv_python(K_PYFATE)
    out = tmp_path_factory.mktemp("fate-payloads")
    _run_generator(python, K_GENERATOR, out)
    manifest = json.loads((out / "manifest.json").read_text())
    payloads = []
    for i, entry in enumerate(manifest):
        payloads.append(
            FatePayload(
                object=entry["object"],
                content_type=entry["content_type"],
                envelope=Envelope(
                    message_id=f"fate-{i:03d}",
                    session_id=entry["session"],
                    topic=entry["topic"],
                    src_party=entry["src_party"],
                    dst_party=entry["dst_party"],
                    payload=(out / entry["file"]).read_bytes(),
                    src_role="guest",
                    dst_role="host",
                ),
            )
        )
    return payloads


@pytest.fixture(scope="session")
def rollsite_packets(
    tmp_path_factory: pytest.TempPathFactory, fate_payloads: list[FatePayload]
) -> list[tuple[str, Envelope]]:
    """The inline FATE objects above, pushed by the real EggRoll rollsite client: (object, packet)."""
    python = _venv_python(K_EGGROLL)
    objects = tmp_path_factory.mktemp("fate-objects")
    for p in fate_payloads:
        if p.content_type == "text/plain" and not p.object.startswith("big_"):
            (objects / f"{p.object}.obj").write_bytes(osx_pb2.Message.FromString(p.envelope.payload).body)
    out = tmp_path_factory.mktemp("rollsite-packets")
    _run_generator(python, K_ROLLSITE_GENERATOR, objects, out)
    packets = []
    for i, entry in enumerate(json.loads((out / "manifest.json").read_text())):
        env = Envelope(
            message_id=f"rs-{i:03d}",
            session_id="audit-rs",
            topic=entry["object"],
            src_party="9999",
            dst_party="10000",
            payload=(out / entry["file"]).read_bytes(),
            protocol="rollsite",
        )
        packets.append((str(entry["object"]), env))
    return packets


def osx_envelope(
    name: str,
    body: bytes,
    *,
    session: str = "sess-1",
    src: str = "9999",
    dst: str = "10000",
    content_type: str = "text/plain",
    message_id: str = "",
) -> Envelope:
    """An envelope shaped like a FATE OSX push (``Message(head=JSON, body=FATE bytes)``)."""
    head = {"content_type": content_type, "app_id": dst, "message_id": name, "correlation_id": "tag"}
    msg = osx_pb2.Message(head=json.dumps(head).encode(), body=body)
    return Envelope(
        message_id=message_id or f"{name}-{len(body)}",
        session_id=session,
        topic=f"{session}-guest-{src}-host-{dst}-{name}",
        src_party=src,
        dst_party=dst,
        payload=msg.SerializeToString(),
    )


def fate_inline(obj_pickle: bytes) -> bytes:
    """FATE object bytes of an inline pickle (mode byte 0)."""
    return b"\x00" + obj_pickle


class _Gadget:
    """Pickles to ``os.system(command)``: the classic unpickling RCE."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def gadget_pickle(command: str, protocol: int = 4) -> bytes:
    return pickle.dumps(_Gadget(command), protocol=protocol)


def forged_pk_pickle(bits: int) -> bytes:
    """A ``fate_utils.paillier.PK`` pickle with a ``bits``-bit modulus, built by hand (see bench.py)."""
    return fate_key_pickle(bits)


@pytest.fixture
def canary(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A path that a gadget would create if anything ever executed it."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a gadget pickle was executed"
