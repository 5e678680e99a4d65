"""Test harness for the interop suite: the client venvs, fedgate gateways as processes, drivers.

Rules of this file:

- Gateways run as separate processes (``python -m fedgate run --config FILE``) with the interpreter
  that runs pytest, each serving one party, on free 127.0.0.1 ports; their configs and OSX route
  tables are written under the test's tmp directory and their logs are kept there for failures.
- Drivers run inside the client venvs (``-I``: isolated, so fedgate can never be imported there)
  and report one ``RESULT {json}`` line; :func:`run_drivers` runs several at once with a bound on
  wall time and returns their parsed results with the stderr tail for assertion messages.
- A venv that is missing is a skip with the reason, or a failure when ``CI`` is set.
- Every process started here is stopped here, by its own pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = [
    "K_DRIVERS",
    "DriverRun",
    "Gateway",
    "fate_party_argv",
    "free_port",
    "free_ports",
    "gateway_mesh",
    "require_venv",
    "run_drivers",
    "venvs_dir",
]

K_REPO = pathlib.Path(__file__).resolve().parents[2]
K_DRIVERS = pathlib.Path(__file__).resolve().parent / "drivers"
K_GATEWAY_START_TIMEOUT = 30.0  # seconds
K_STOP_TIMEOUT = 15.0  # seconds: SIGTERM grace before SIGKILL
K_SETTLE = 0.2  # seconds a started gateway must stay alive after its listeners answered
K_MAX_POP_WAIT = 90.0  # seconds: gateways cap FATE's 10-hour pops so a broken test fails, not hangs
# pyfate's standalone computing forks workers that use gRPC (fate-wire.md section 4).
K_FORK_ENV = {"GRPC_ENABLE_FORK_SUPPORT": "true", "GRPC_POLL_STRATEGY": "poll"}


def venvs_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FEDGATE_INTEROP_VENVS", K_REPO / ".test-venvs"))


def require_venv(name: str) -> pathlib.Path:
    """The python of client venv ``name``; skips (or fails under CI) when it is not built."""
    root = venvs_dir()
    python = root / name / "bin" / "python"
    if python.exists() and (root / name / ".stamp").exists():
        return python
    failed = root / f"{name}.failed"
    why = failed.read_text().strip() if failed.exists() else "not built"
    msg = (
        f"interop venv {root / name} unavailable: {why}; "
        "build it with `make interop-venv` (bash scripts/make-interop-venvs.sh)"
    )
    if os.environ.get("CI"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all bound at once, so the kernel cannot repeat one)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_port(port: int, *, proc: subprocess.Popen[bytes], log: pathlib.Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode} before listening:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"gateway not listening on 127.0.0.1:{port} after {timeout} s:\n{_tail(log)}")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Gateway:
    """One fedgate gateway process serving ``party``; ``start``/``stop``/``kill`` may repeat."""

    party: str
    home: pathlib.Path
    front_port: int = field(default_factory=free_port)
    link_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    max_pop_wait_s: float = K_MAX_POP_WAIT
    """Cap on a parked pop (seconds); FATE asks for 10 hours."""
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def config_file(self) -> pathlib.Path:
        return self.home / "fedgate.toml"

    @property
    def route_file(self) -> pathlib.Path:
        return self.home / "route_table.json"

    @property
    def log(self) -> pathlib.Path:
        return self.home / "gateway.log"

    def write_config(self, routes: Mapping[str, Any]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        table = {"self_party": [self.party], "route_table": dict(routes)}
        self.route_file.write_text(json.dumps(table, indent=2))
        self.config_file.write_text(
            "\n".join(
                [
                    "[gateway]",
                    f'party_ids = ["{self.party}"]',
                    f'name = "fedgate-{self.party}"',
                    "drain_timeout_s = 2.0",
                    "[front]",
                    f'listen = "127.0.0.1:{self.front_port}"',
                    f"max_pop_wait_s = {self.max_pop_wait_s}",
                    "[link]",
                    f'listen = "127.0.0.1:{self.link_port}"',
                    "insecure = true",
                    "[store]",
                    f'path = "{self.home / "fedgate.db"}"',
                    "min_free_bytes = 0",
                    "[metrics]",
                    f'listen = "127.0.0.1:{self.metrics_port}"',
                    "[routes]",
                    f'file = "{self.route_file}"',
                    "",
                ]
            )
        )

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "gateway already running"
        self.starts += 1
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as log:
            log.write(f"---- start #{self.starts} ----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedgate", "run", "--config", str(self.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.home,
            )
        # Ready means: front and metrics listen and the process is still alive after that (a
        # failure to bind a later listener makes it exit after the front already answered).
        for port in (self.front_port, self.metrics_port):
            wait_port(port, proc=self.proc, log=self.log, timeout=K_GATEWAY_START_TIMEOUT)
        time.sleep(K_SETTLE)
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway {self.party} exited with {self.proc.returncode}:\n{_tail(self.log)}")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` and wait for the exit; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=K_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=K_STOP_TIMEOUT)
        return int(self.proc.returncode)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)

    def log_tail(self, lines: int = 30) -> str:
        return f"--- gateway {self.party} log ({self.log}) ---\n{_tail(self.log, lines)}"


@contextlib.contextmanager
def gateway_mesh(
    root: pathlib.Path,
    parties: Sequence[str],
    *,
    transport: str = "grpc",
    max_pop_wait_s: float = K_MAX_POP_WAIT,
) -> Iterator[dict[str, Gateway]]:
    """One gateway per party, each routing every other party to that party's gateway.

    ``transport`` ``grpc`` points a route at the peer's front (the OSX ``invoke`` hop); a link
    transport (``tcp`` ...) points it at the peer's link listener.
    """
    ports = iter(free_ports(3 * len(parties)))
    gateways = {
        p: Gateway(party=p, home=root / f"gw-{p}", front_port=next(ports), link_port=next(ports),
                   metrics_port=next(ports), max_pop_wait_s=max_pop_wait_s)
        for p in parties
    }  # fmt: skip
    for p, gw in gateways.items():
        routes: dict[str, Any] = {}
        for q, peer in gateways.items():
            if q == p:
                continue
            port = peer.front_port if transport == "grpc" else peer.link_port
            routes[q] = {"default": [{"ip": "127.0.0.1", "port": port, "transport": transport}]}
        gw.write_config(routes)
    try:
        for gw in gateways.values():
            gw.start()
        if transport != "grpc" and not all(_listening(gw.link_port) for gw in gateways.values()):
            pytest.skip(f"transport {transport!r}: `fedgate run` does not listen on its [link] address yet")
        yield gateways
    finally:
        for gw in gateways.values():
            gw.stop()


@dataclass(frozen=True, slots=True)
class DriverRun:
    """What one driver process reported."""

    name: str
    returncode: int | None
    """None: killed after the time limit."""
    result: dict[str, Any]
    """The parsed ``RESULT`` line ({} when there was none)."""
    stderr_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.result.get("ok"))

    def describe(self) -> str:
        return f"[{self.name}] rc={self.returncode} result={self.result}\n{self.stderr_tail}"


def run_drivers(
    python: pathlib.Path,
    commands: Mapping[str, Sequence[str]],
    *,
    workdir: pathlib.Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> dict[str, DriverRun]:
    """Run ``python -I DRIVER ARGS`` for each entry at once; wait for all (at most ``timeout`` s)."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    full_env = {**base, **K_FORK_ENV, **(env or {})}
    procs: dict[str, tuple[subprocess.Popen[bytes], pathlib.Path, pathlib.Path]] = {}
    try:
        for name, argv in commands.items():
            out = workdir / f"{name}.out"
            err = workdir / f"{name}.err"
            with open(out, "wb") as fo, open(err, "wb") as fe:
                procs[name] = (
                    subprocess.Popen([str(python), "-I", *argv], stdout=fo, stderr=fe, env=full_env, cwd=workdir),
                    out,
                    err,
                )
        deadline = time.monotonic() + timeout
        runs: dict[str, DriverRun] = {}
        for name, (proc, out, err) in procs.items():
            rc: int | None
            try:
                rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            runs[name] = DriverRun(name, rc, _result(out), _stderr_tail(err))
        return runs
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=K_STOP_TIMEOUT)


def _result(out: pathlib.Path) -> dict[str, Any]:
    for line in reversed(out.read_text(errors="replace").splitlines()):
        if line.startswith("RESULT "):
            parsed: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return parsed
    return {}


def _stderr_tail(err: pathlib.Path, lines: int = 25) -> str:
    # gRPC's fork-support notices ("FD from fork parent still in poll list") are noise here.
    text = [ln for ln in err.read_text(errors="replace").splitlines() if "ev_poll_posix" not in ln]
    return "\n".join(text[-lines:])


def fate_party_argv(
    *,
    role: str,
    party_id: str,
    parties: Sequence[tuple[str, str]],
    port: int,
    session: str,
    data_dir: pathlib.Path,
    scenario: str = "triad",
    phase: str = "both",
    iterations: int = 3,
    extra: Sequence[str] = (),
) -> list[str]:
    """The argv of one ``fate_party.py`` driver process."""
    return [
        str(K_DRIVERS / "fate_party.py"),
        "--role", role,
        "--party-id", party_id,
        "--parties", ",".join(f"{r}:{p}" for r, p in parties),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--session", session,
        "--data-dir", str(data_dir),
        "--scenario", scenario,
        "--phase", phase,
        "--iterations", str(iterations),
        *extra,
    ]  # fmt: skip
