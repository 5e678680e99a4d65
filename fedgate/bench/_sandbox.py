"""One benchmark run's network namespaces and child processes, and their guaranteed removal.

Rules of this module:

1. Every name is unique per run: namespaces are ``fgb-<pid>-<token>-<role>``, devices
   ``fgb<token><suffix>`` (at most 15 characters), so concurrent runs and other engineers'
   namespaces are never touched.
2. Only processes this run started are signalled, by pid, never by name. Each child also gets
   ``PR_SET_PDEATHSIG`` = SIGKILL so that it dies with us even if we are killed with SIGKILL.
3. :meth:`Sandbox.close` is idempotent and never raises: it kills our children (SIGTERM, then
   SIGKILL after a grace period), then deletes our namespaces (which removes their devices).
4. :func:`remove_stale` deletes namespaces left by runs whose pid no longer exists (a run that was
   SIGKILLed cannot clean up after itself); live runs' namespaces are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from fedgate.errors import LocalError

__all__ = ["BenchSetupError", "Sandbox", "child_env", "remove_stale", "run_cmd", "wait_listening"]

K_PREFIX = "fgb"  # prefix of every namespace and device name this harness creates
K_PR_SET_PDEATHSIG = 1  # prctl(2) option
K_KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL at cleanup
K_TCP_MEM = "4096 131072 67108864"  # bytes: min default max socket buffer (room for 320 ms x 1 Gbit/s)
K_NETNS_DIR = Path("/run/netns")


class BenchSetupError(LocalError):
    """The benchmark could not set up its namespaces, devices or processes."""


def run_cmd(argv: Sequence[str], *, timeout: float = 10.0) -> str:
    """Run a set-up command; return stdout, raise BenchSetupError with stderr on failure."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchSetupError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise BenchSetupError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(K_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def child_env() -> dict[str, str]:
    """The environment of children: ours, with this checkout importable even if not installed."""
    import fedgate  # local import: only the package location is needed

    root = str(Path(fedgate.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Sandbox:
    """Namespaces and processes of one run. Use as a context manager or call close()."""

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token or secrets.token_hex(3)
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        self._env = child_env()
        self._closed = False

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def device_name(self, suffix: str) -> str:
        """A device name unique to this run."""
        name = f"{K_PREFIX}{self.token}{suffix}"
        if len(name) > 15:
            raise ValueError(f"device name {name!r} is longer than 15 characters")
        return name

    def add_netns(self, role: str) -> str:
        """Create a namespace with loopback up and large TCP buffers; return its name."""
        name = f"{K_PREFIX}-{os.getpid()}-{self.token}-{role}"
        run_cmd(["ip", "netns", "add", name])
        self.netns.append(name)
        run_cmd(["ip", "-n", name, "link", "set", "lo", "up"])
        sysctls = [f"net.ipv4.tcp_rmem={K_TCP_MEM}", f"net.ipv4.tcp_wmem={K_TCP_MEM}"]
        sysctls.append("net.ipv6.conf.all.disable_ipv6=1")  # no stray router solicitations on the link
        sysctls.append("net.ipv6.conf.default.disable_ipv6=1")
        run_cmd(["ip", "netns", "exec", name, "sysctl", "-q", "-w", *sysctls])
        return name

    def spawn(
        self,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        stdin: int | IO[str] | None = subprocess.DEVNULL,
        stdout: int | IO[str] | None = subprocess.PIPE,
        stderr: int | IO[str] | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        """Start a child (inside ``netns`` if given; text pipes unless told otherwise); track its pid."""
        if self._closed:
            raise BenchSetupError("sandbox already closed")
        full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
        proc = subprocess.Popen(
            full,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=True,
            env=self._env,
            preexec_fn=_die_with_parent,  # single-threaded here, so preexec_fn is safe
            start_new_session=True,  # a terminal Ctrl-C reaches us only; we stop the children
        )
        self.procs.append(proc)
        return proc

    def python(
        self, module: str, args: Sequence[str], *, netns: str | None = None, rt_priority: int = 0
    ) -> subprocess.Popen[str]:
        """Start ``python -m module args`` with this interpreter (SCHED_FIFO via chrt if rt_priority > 0)."""
        argv = [sys.executable, "-m", module, *args]
        if rt_priority > 0 and shutil.which("chrt"):
            argv = ["chrt", "-f", str(rt_priority), *argv]
        return self.spawn(argv, netns=netns)

    def stop(self, proc: subprocess.Popen[str], *, grace: float = K_KILL_GRACE) -> None:
        """Terminate one of our children (SIGTERM, then SIGKILL) and reap it."""
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace)
            except ProcessLookupError:
                pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def close(self) -> None:
        """Kill our children, delete our namespaces; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        for proc in self.procs:
            with contextlib.suppress(Exception):  # cleanup must go on
                self.stop(proc)
        for name in reversed(self.netns):
            with contextlib.suppress(BenchSetupError):
                run_cmd(["ip", "netns", "del", name])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces of earlier runs whose process is gone; return their names."""
    removed: list[str] = []
    if not K_NETNS_DIR.is_dir():
        return removed
    for entry in sorted(K_NETNS_DIR.iterdir()):
        parts = entry.name.split("-")
        if len(parts) != 4 or parts[0] != K_PREFIX or not parts[1].isdigit():
            continue
        if _pid_alive(int(parts[1])):
            continue
        try:
            run_cmd(["ip", "netns", "del", entry.name])
            removed.append(entry.name)
        except BenchSetupError:
            pass
    return removed


def wait_listening(pid: int, port: int, *, proto: str, timeout: float) -> bool:
    """Wait until process ``pid``'s namespace has a socket bound to local ``port`` (tcp: listening)."""
    deadline = time.monotonic() + timeout
    hexport = f":{port:04X}"
    files = ("tcp", "tcp6") if proto == "tcp" else ("udp", "udp6")
    while time.monotonic() < deadline:
        for name in files:
            try:
                lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
            except OSError:
                return False
            for line in lines:
                fields = line.split()
                if fields[1].endswith(hexport) and (proto != "tcp" or fields[3] == "0A"):
                    return True
        time.sleep(0.02)
    return False
