"""The userspace link emulator's process: two TUN devices and a select() forwarding loop.

Run by :class:`fedgate.bench.TunLink` (never by hand, though it can be)::

    python -m fedgate.bench.tun_forwarder --ns-a NS_A --dev-a TUN_A --ns-b NS_B --dev-b TUN_B --seed N

Rules of this module:

1. It creates one TUN device (``IFF_TUN | IFF_NO_PI``) inside each of the two network namespaces
   (``setns`` into each, ``TUNSETIFF``, then back), so the devices live where the traffic is while
   this one process owns both file descriptors. The caller configures addresses with ``ip -n``.
2. Packets read from ``TUN_A`` go through the ``a_to_b`` :class:`~fedgate.bench._emucore.EmuDirection`
   and are written to ``TUN_B``; the other way likewise. All shaping decisions live in the pure core.
3. The loop is a single ``select()`` (microsecond timeouts, unlike ``epoll``'s milliseconds) over the
   two TUN fds and the control pipe; reads are batched (up to K_READ_BATCH per fd per wake-up); the
   clock is read once per batch; shaping constants are precomputed in the core.
4. Control protocol: JSON lines on stdin, one JSON reply line each on stdout. The first stdout line
   is ``{"ready": true, ...}`` once both devices exist. Commands: ``shape`` (``a_to_b`` and ``b_to_a``
   tables of :class:`~fedgate.bench._emucore.DirectionShape` fields), ``reset``, ``stats``, ``quit``.
   End of file on stdin means quit, so the process never outlives its parent.
5. Ctrl-C (SIGINT) is ignored here: the parent owns cleanup and tells this process to quit.
6. With ``--rt-priority N`` the process runs SCHED_FIFO so that other work on a busy host does not make
   deliveries late (the loop sleeps in select(); the kernel's RT throttling still caps it at 95% of a
   CPU). The ready line says which scheduling it got.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from fedgate.bench._emucore import DirectionShape, EmuDirection
from fedgate.configtree import build
from fedgate.errors import ConfigError

__all__ = ["main", "open_tun_in_netns"]

K_TUNSETIFF = 0x400454CA  # ioctl request number (linux/if_tun.h)
K_IFF_TUN = 0x0001  # flag: layer-3 device
K_IFF_NO_PI = 0x1000  # flag: no packet-information header
K_CLONE_NEWNET = 0x40000000  # setns(2) namespace type
K_READ_BATCH = 256  # packets read from one fd per wake-up, at most
K_MAX_PACKET = 65536  # bytes; larger than any MTU we configure


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, K_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_tun_in_netns(netns: str, dev: str) -> int:
    """Create TUN device ``dev`` inside network namespace ``netns``; return its non-blocking fd."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            try:
                fcntl.ioctl(fd, K_TUNSETIFF, struct.pack("16sH22x", dev.encode(), K_IFF_TUN | K_IFF_NO_PI))
            except OSError:
                os.close(fd)
                raise
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)
    return fd


class _Forwarder:
    """The loop and its control channel (state lives on the instance, nothing at module level)."""

    def __init__(self, fd_a: int, fd_b: int, *, seed: int) -> None:
        self.fd_a = fd_a
        self.fd_b = fd_b
        self.a_to_b = EmuDirection(DirectionShape(), seed=seed)
        self.b_to_a = EmuDirection(DirectionShape(), seed=seed + 1)
        self.write_errors = 0
        self.wakeups = 0
        self.ctrl_buf = b""
        self.running = True
        self.reset()

    def reset(self) -> None:
        self.a_to_b.reset_stats()
        self.b_to_a.reset_stats()
        self.write_errors = 0
        self.wakeups = 0
        self.t0 = time.monotonic()
        self.cpu0 = time.process_time()

    def stats(self) -> dict[str, Any]:
        return {
            "a_to_b": self.a_to_b.stats().as_dict(),
            "b_to_a": self.b_to_a.stats().as_dict(),
            "wall_s": time.monotonic() - self.t0,
            "cpu_s": time.process_time() - self.cpu0,
            "write_errors": self.write_errors,
            "wakeups": self.wakeups,
        }

    def command(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "shape":
                self.a_to_b.reshape(build(DirectionShape, msg.get("a_to_b", {}), path="a_to_b"))
                self.b_to_a.reshape(build(DirectionShape, msg.get("b_to_a", {}), path="b_to_a"))
                return {"ok": True}
            if cmd == "reset":
                self.reset()
                return {"ok": True}
            if cmd == "stats":
                return {"ok": True, "stats": self.stats()}
            if cmd == "quit":
                self.running = False
                return {"ok": True, "stats": self.stats()}
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        except (ValueError, AttributeError, ConfigError) as exc:
            return {"ok": False, "error": str(exc)}

    def on_control(self) -> None:
        data = os.read(0, 65536)
        if not data:
            self.running = False
            return
        self.ctrl_buf += data
        while b"\n" in self.ctrl_buf:
            line, self.ctrl_buf = self.ctrl_buf.split(b"\n", 1)
            if line.strip():
                sys.stdout.write(json.dumps(self.command(line)) + "\n")
                sys.stdout.flush()

    def run(self) -> None:
        fd_a, fd_b = self.fd_a, self.fd_b
        ab, ba = self.a_to_b, self.b_to_a
        ab_offer, ba_offer = ab.offer, ba.offer
        mono = time.monotonic
        sel = select.select
        read, write = os.read, os.write
        rlist = [fd_a, fd_b, 0]
        while self.running:
            now = mono()
            for packet in ab.pop_due(now=now):
                try:
                    write(fd_b, packet)
                except OSError:
                    self.write_errors += 1
            for packet in ba.pop_due(now=now):
                try:
                    write(fd_a, packet)
                except OSError:
                    self.write_errors += 1
            t_ab, t_ba = ab.next_due(), ba.next_due()
            if t_ab is None and t_ba is None:
                timeout: float | None = None
            else:
                due = min(t for t in (t_ab, t_ba) if t is not None)
                timeout = max(0.0, due - mono())
            ready = sel(rlist, [], [], timeout)[0]
            self.wakeups += 1
            if not ready:
                continue
            now = mono()
            for fd in ready:
                if fd == 0:
                    self.on_control()
                    continue
                offer = ab_offer if fd == fd_a else ba_offer
                for _ in range(K_READ_BATCH):
                    try:
                        packet = read(fd, K_MAX_PACKET)
                    except BlockingIOError:
                        break
                    offer(packet, now=now)


def main(argv: Sequence[str]) -> int:
    """Entry point: create both TUN devices, announce readiness, forward until told to quit."""
    parser = argparse.ArgumentParser(prog="python -m fedgate.bench.tun_forwarder")
    parser.add_argument("--ns-a", required=True, help="network namespace of side A (the sender)")
    parser.add_argument("--dev-a", required=True, help="TUN device name to create in side A")
    parser.add_argument("--ns-b", required=True, help="network namespace of side B (the receiver)")
    parser.add_argument("--dev-b", required=True, help="TUN device name to create in side B")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the loss stages")
    parser.add_argument(
        "--rt-priority",
        type=int,
        default=0,
        help="SCHED_FIFO priority of this process (0: normal scheduling)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fd_a = open_tun_in_netns(args.ns_a, args.dev_a)
        fd_b = open_tun_in_netns(args.ns_b, args.dev_b)
    except OSError as exc:
        sys.stdout.write(json.dumps({"ready": False, "error": str(exc)}) + "\n")
        sys.stdout.flush()
        return 1
    forwarder = _Forwarder(fd_a, fd_b, seed=args.seed)
    sched = "normal"
    if args.rt_priority > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt_priority))
            sched = f"SCHED_FIFO {args.rt_priority}"
        except OSError as exc:
            sched = f"normal (SCHED_FIFO refused: {exc.strerror})"
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "sched": sched}) + "\n")
    sys.stdout.flush()
    forwarder.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
