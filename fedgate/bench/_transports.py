"""The transport-runner registry: which bulk transfers the harness can compare, and how to run them.

Rules of this module:

1. A runner is a Python module with the contract ``serve --listen HOST:PORT`` (run in the receiver's
   namespace) and ``send --connect HOST:PORT --duration S [--cc NAME]`` (in the sender's), each
   printing ONE JSON line on stdout at the end. Receiver JSON has at least ``bytes`` and ``seconds``;
   sender JSON at least ``bytes_sent``, ``packets_sent`` and ``packets_lost``.
2. The registry is built explicitly in :func:`build_transports`, in one place; an unknown name raises
   :class:`~fedgate.errors.UnknownPluginError` listing the valid ones.
3. A runner whose module cannot be imported (the QUIC carrier before it lands, say) is *unavailable*:
   :func:`availability` returns the reason and the harness lists it instead of failing.
4. Each runner knows its payload share (application bytes per IP packet), used for the physical limit.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedgate.bench._sandbox import child_env
from fedgate.errors import UnknownPluginError

__all__ = ["TransportRunner", "availability", "build_transports", "select_transports"]

K_TCP_OVERHEAD = 20 + 20 + 12  # bytes per packet: IPv4, TCP, timestamp option
K_QUIC_DATAGRAM = 1452  # bytes: the QUIC carrier's UDP payload size (fact sheet)
K_QUIC_OVERHEAD = 1 + 8 + 4 + 16 + 12  # bytes per datagram: short header, DCID, PN, AEAD tag, STREAM frame
K_IMPORT_TIMEOUT = 30.0  # seconds allowed for the import check of a runner module


def _tcp_share(mtu: int) -> float:
    return (mtu - K_TCP_OVERHEAD) / mtu


def _quic_share(mtu: int) -> float:
    datagram = min(K_QUIC_DATAGRAM, mtu - 28)
    return (datagram - K_QUIC_OVERHEAD) / (datagram + 28)


@dataclass(frozen=True, slots=True)
class TransportRunner:
    """How to run one transport's bulk transfer."""

    name: str
    """Registry name (``kernel-bbr``)."""
    module: str
    """The module run with ``python -m`` on both sides."""
    cc: str | None
    """Congestion control passed as ``--cc``; None passes nothing (the module's default)."""
    proto: Literal["tcp", "udp"]
    """What the server listens on (the harness waits for the port before starting the sender)."""
    payload_share: Callable[[int], float]
    """Application bytes per IP packet over the IP packet size, as a function of the MTU."""
    description: str
    """One line for ``--list-transports``."""

    def server_argv(self, listen: str) -> list[str]:
        """``python -m module serve --listen HOST:PORT``."""
        return [sys.executable, "-m", self.module, "serve", "--listen", listen]

    def client_argv(self, connect: str, *, duration: float) -> list[str]:
        """``python -m module send --connect HOST:PORT --duration S [--cc NAME]``."""
        argv = [
            sys.executable,
            "-m",
            self.module,
            "send",
            "--connect",
            connect,
            "--duration",
            f"{duration:g}",
        ]
        if self.cc:
            argv += ["--cc", self.cc]
        return argv


def build_transports() -> dict[str, TransportRunner]:
    """The registry, built once, in this one place."""
    runners = (
        TransportRunner(
            "kernel-cubic",
            "fedgate.bench.tcp_bulk",
            "cubic",
            "tcp",
            _tcp_share,
            "kernel TCP, CUBIC (per socket)",
        ),
        TransportRunner(
            "kernel-bbr",
            "fedgate.bench.tcp_bulk",
            "bbr",
            "tcp",
            _tcp_share,
            "kernel TCP, BBR v1 (per socket)",
        ),
        TransportRunner(
            "fedgate-quic",
            "fedgate.congestion.quic_bulk",
            None,
            "udp",
            _quic_share,
            "fedgate's QUIC carrier with its default congestion controller",
        ),
    )
    return {r.name: r for r in runners}


def select_transports(names: Sequence[str], registry: dict[str, TransportRunner]) -> list[TransportRunner]:
    """Look names up; an unknown one raises UnknownPluginError listing the valid names."""
    out = []
    for name in names:
        if name not in registry:
            raise UnknownPluginError("transport", name, list(registry), path="--transports")
        out.append(registry[name])
    return out


def _kernel_ccs() -> set[str]:
    path = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def availability(runner: TransportRunner) -> str | None:
    """None when the runner can run here, else the reason (import error, missing kernel CC)."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {runner.module}"],
        capture_output=True,
        text=True,
        timeout=K_IMPORT_TIMEOUT,
        check=False,
        env=child_env(),
    )
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit {done.returncode}"
        return f"module {runner.module} cannot be imported: {last}"
    if runner.module == "fedgate.bench.tcp_bulk" and runner.cc and runner.cc not in _kernel_ccs():
        return f"kernel congestion control {runner.cc!r} is not available (try: modprobe tcp_{runner.cc})"
    return None
