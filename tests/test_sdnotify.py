"""systemd notify protocol against a real AF_UNIX datagram socket (path and abstract namespace)."""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time
import uuid
from collections.abc import Iterator

import pytest

from fedgate.sdnotify import SystemdNotifier, notify_address, watchdog_interval


class Listener:
    """Plays systemd's side: a bound datagram socket that also reads the sender's credentials."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    def receive(self) -> tuple[dict[str, str], int]:
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
        lines = data.decode().split("\n")
        return dict(line.split("=", 1) for line in lines), pid

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_listener(tmp_path: pathlib.Path) -> Iterator[tuple[Listener, str]]:
    path = str(tmp_path / "notify")
    listener = Listener(path)
    yield listener, path
    listener.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[Listener, str]]:
    name = f"fedgate-test-{os.getpid()}-{uuid.uuid4().hex}"
    listener = Listener("\0" + name)
    yield listener, "@" + name
    listener.close()


def test_ready_with_status_on_a_path_socket(path_listener: tuple[Listener, str]) -> None:
    listener, env_value = path_listener
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": env_value})
    assert notifier.enabled
    assert notifier.ready(status="serving parties 9999")
    fields, pid = listener.receive()
    assert fields == {"READY": "1", "STATUS": "serving parties 9999"}
    assert pid == os.getpid()  # what NotifyAccess=main checks
    notifier.close()


def test_abstract_namespace_socket(abstract_listener: tuple[Listener, str]) -> None:
    listener, env_value = abstract_listener
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": env_value})
    assert notifier.stopping()
    assert listener.receive()[0] == {"STOPPING": "1"}
    assert notifier.status("draining 3 calls")
    assert listener.receive()[0] == {"STATUS": "draining 3 calls"}
    notifier.close()


def test_reloading_carries_monotonic_usec(path_listener: tuple[Listener, str]) -> None:
    listener, env_value = path_listener
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": env_value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields, _ = listener.receive()
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    assert notifier.ready()
    assert listener.receive()[0] == {"READY": "1"}
    notifier.close()


def test_status_newlines_cannot_inject_fields(path_listener: tuple[Listener, str]) -> None:
    listener, env_value = path_listener
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": env_value})
    notifier.status("bad\nREADY=1")
    assert listener.receive()[0] == {"STATUS": "bad READY=1"}
    notifier.close()


def test_watchdog_pings_only_when_systemd_asked(path_listener: tuple[Listener, str]) -> None:
    listener, env_value = path_listener
    quiet = SystemdNotifier.from_environment({"NOTIFY_SOCKET": env_value})
    assert quiet.watchdog_interval() is None
    assert quiet.watchdog() is False
    env = {"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = SystemdNotifier.from_environment(env)
    assert notifier.watchdog_interval() == 15.0
    assert notifier.watchdog()
    assert listener.receive()[0] == {"WATCHDOG": "1"}
    quiet.close()
    notifier.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert notifier.ready(status="x") is False
    assert notifier.watchdog() is False
    notifier.close()


def test_a_dead_socket_does_not_raise(tmp_path: pathlib.Path) -> None:
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.enabled
    assert notifier.ready() is False
    notifier.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@sd-notify", "\0sd-notify"),
        ("@", None),
        ("vsock:2:1234", None),
        ("relative/path", None),
    ],
)
def test_notify_address(value: str | None, expected: str | None) -> None:
    assert notify_address(value) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "²"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected
