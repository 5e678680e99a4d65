"""Link emulators between two network namespaces, behind one interface (:class:`LinkEmulator`).

Two implementations, picked by :func:`open_link` (``auto`` prefers netem):

* :class:`NetemLink`: a veth pair, one end in each namespace, and kernel ``tc netem`` (delay, random
  loss, rate with a packet limit) on the egress of both ends. Needs ``sch_netem``.
* :class:`TunLink`: a TUN device in each namespace joined by the userspace forwarder process
  (``python -m fedgate.bench.tun_forwarder``), for kernels without netem (like this project's machines).

Rules of this module:

1. Side A is the sender's namespace, side B the receiver's; ``a_to_b`` is the data direction.
2. Both implementations report per-direction counters with the same keys (``packets_in``,
   ``packets_out``, ``bytes_out``, ``drops``, ``drop_loss``, ``drop_queue``, ``queue_peak_bytes``);
   a counter an implementation cannot know is ``None`` (netem does not split drops by cause).
3. Everything created here is created through the run's :class:`~fedgate.bench._sandbox.Sandbox`,
   which removes it; ``close()`` here only stops the emulator politely.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import select
import subprocess
import sys
from typing import Any, Literal, Protocol

from fedgate.bench._emucore import DirectionShape
from fedgate.bench._matrix import LinkSettings
from fedgate.bench._sandbox import BenchSetupError, Sandbox, run_cmd
from fedgate.errors import UnknownPluginError

__all__ = [
    "EmulatorKind",
    "LinkEmulator",
    "NetemLink",
    "TunLink",
    "netem_argv",
    "netem_available",
    "open_link",
]

EmulatorKind = Literal["auto", "netem", "tun"]

K_ADDR_A = "10.77.0.1"  # sender side address (namespaces are private, so fixed addresses are fine)
K_ADDR_B = "10.77.0.2"  # receiver side address
K_CONTROL_TIMEOUT = 10.0  # seconds to wait for the forwarder's reply
K_TXQUEUELEN = 1000  # packets; the TUN device's own queue in front of the forwarder


class LinkEmulator(Protocol):
    """An emulated link between two namespaces."""

    @property
    def kind(self) -> str:
        """``netem`` or ``tun``."""
        ...

    @property
    def ns_a(self) -> str:
        """The sender's namespace."""
        ...

    @property
    def ns_b(self) -> str:
        """The receiver's namespace."""
        ...

    @property
    def addr_a(self) -> str:
        """The sender's IPv4 address."""
        ...

    @property
    def addr_b(self) -> str:
        """The receiver's IPv4 address."""
        ...

    def shape(self, settings: LinkSettings) -> None:
        """Apply settings to both directions."""
        ...

    def reset_stats(self) -> None:
        """Start a new counting window."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: ``a_to_b`` and ``b_to_a`` tables, plus implementation extras."""
        ...

    def close(self) -> None:
        """Stop the emulator (the sandbox removes namespaces and devices)."""
        ...


class TunLink:
    """Userspace emulator: TUN devices in both namespaces, the forwarder process between them."""

    kind = "tun"
    addr_a = K_ADDR_A
    addr_b = K_ADDR_B

    def __init__(self, sandbox: Sandbox, *, mtu: int = 1500, seed: int = 1, rt_priority: int = 0) -> None:
        self.ns_a = sandbox.add_netns("a")
        self.ns_b = sandbox.add_netns("b")
        dev_a, dev_b = sandbox.device_name("a"), sandbox.device_name("b")
        args = [
            "--rt-priority",
            str(rt_priority),
            "--ns-a",
            self.ns_a,
            "--dev-a",
            dev_a,
            "--ns-b",
            self.ns_b,
            "--dev-b",
            dev_b,
            "--seed",
            str(seed),
        ]
        self._sandbox = sandbox
        self._proc = sandbox.spawn(
            [sys.executable, "-m", "fedgate.bench.tun_forwarder", *args], stdin=subprocess.PIPE
        )
        ready = self._reply()
        if not ready.get("ready"):
            raise BenchSetupError(f"TUN forwarder failed: {ready.get('error', ready)}")
        self.forwarder_pid: int = self._proc.pid
        self.sched: str = str(ready.get("sched", "normal"))
        for ns, dev, local, peer in (
            (self.ns_a, dev_a, K_ADDR_A, K_ADDR_B),
            (self.ns_b, dev_b, K_ADDR_B, K_ADDR_A),
        ):
            run_cmd(["ip", "-n", ns, "addr", "add", local, "peer", f"{peer}/32", "dev", dev])
            run_cmd(
                ["ip", "-n", ns, "link", "set", dev, "mtu", str(mtu), "txqueuelen", str(K_TXQUEUELEN), "up"]
            )
        self._devs = {self.ns_a: dev_a, self.ns_b: dev_b}
        self._tx_dropped_base: dict[str, int | None] = {}

    def _reply(self) -> dict[str, Any]:
        out = self._proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], K_CONTROL_TIMEOUT)
        line = out.readline() if ready else ""
        if not line:
            err = ""
            if self._proc.poll() is not None and self._proc.stderr is not None:
                err = self._proc.stderr.read()[-2000:]
            raise BenchSetupError(f"TUN forwarder did not answer (exit {self._proc.poll()}): {err}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _command(self, msg: dict[str, Any]) -> dict[str, Any]:
        stdin = self._proc.stdin
        if stdin is None or self._proc.poll() is not None:
            raise BenchSetupError("TUN forwarder is not running")
        stdin.write(json.dumps(msg) + "\n")
        stdin.flush()
        reply = self._reply()
        if not reply.get("ok"):
            raise BenchSetupError(f"TUN forwarder refused {msg.get('cmd')}: {reply.get('error')}")
        return reply

    def shape(self, settings: LinkSettings) -> None:
        self._command(
            {
                "cmd": "shape",
                "a_to_b": dataclasses.asdict(settings.a_to_b),
                "b_to_a": dataclasses.asdict(settings.b_to_a),
            }
        )

    def reset_stats(self) -> None:
        self._tx_dropped_base = {ns: _tx_dropped(ns, dev) for ns, dev in self._devs.items()}
        self._command({"cmd": "reset"})

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._command({"cmd": "stats"})["stats"]
        for key in ("a_to_b", "b_to_a"):
            d = stats[key]
            d["drops"] = d["drop_loss"] + d["drop_queue"]
        dropped: dict[str, int | None] = {}
        for ns, dev in self._devs.items():
            now, base = _tx_dropped(ns, dev), self._tx_dropped_base.get(ns)
            dropped[ns] = None if now is None else now - (base or 0)
        stats["device_tx_dropped"] = dropped
        return stats

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(BenchSetupError):
                self._command({"cmd": "quit"})
        self._sandbox.stop(self._proc)


def _tx_dropped(ns: str, dev: str) -> int | None:
    """Packets the kernel dropped in front of a device (outside the emulator's own counters)."""
    try:
        data = json.loads(run_cmd(["ip", "-n", ns, "-s", "-j", "link", "show", dev]))
        return int(data[0]["stats64"]["tx"]["dropped"])
    except (BenchSetupError, ValueError, KeyError, IndexError):
        return None


def netem_argv(ns: str, dev: str, shape: DirectionShape, *, mtu: int, min_packet: int) -> list[str]:
    """The ``tc`` command that gives ``dev`` this direction's shape with netem (pure).

    ``shape.tick_s`` is not used: netem delivers from kernel timers, with no process to wake per packet.
    """
    argv = ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem"]
    argv += ["delay", f"{shape.delay_s * 1e6:.0f}us"]
    if shape.loss:
        argv += ["loss", "random", f"{shape.loss * 100:.6g}%"]
    if shape.rate_bps:
        argv += ["rate", f"{shape.rate_bps:.0f}bit"]
    # netem's limit counts every packet it holds, the delay line included, in packets
    held = shape.queue_bytes + (shape.rate_bps / 8 * shape.delay_s if shape.rate_bps else 0)
    argv += ["limit", str(max(1000, math.ceil(held / min_packet)))]
    return argv


class NetemLink:
    """Kernel emulator: a veth pair and tc netem on both egresses."""

    kind = "netem"
    addr_a = K_ADDR_A
    addr_b = K_ADDR_B

    def __init__(self, sandbox: Sandbox, *, mtu: int = 1500, seed: int = 1) -> None:
        del seed  # netem draws its own randomness
        self.ns_a = sandbox.add_netns("a")
        self.ns_b = sandbox.add_netns("b")
        dev_a, dev_b = sandbox.device_name("a"), sandbox.device_name("b")
        self._mtu = mtu
        run_cmd(
            [
                "ip",
                "link",
                "add",
                dev_a,
                "netns",
                self.ns_a,
                "type",
                "veth",
                "peer",
                "name",
                dev_b,
                "netns",
                self.ns_b,
            ]
        )
        for ns, dev, local in ((self.ns_a, dev_a, K_ADDR_A), (self.ns_b, dev_b, K_ADDR_B)):
            run_cmd(["ip", "-n", ns, "addr", "add", f"{local}/24", "dev", dev])
            # one MTU-sized segment per skb, so netem's rate and loss see real packets, not TSO bursts
            run_cmd(["ip", "-n", ns, "link", "set", dev, "mtu", str(mtu), "gso_max_size", str(mtu)])
            run_cmd(["ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1", "up"])
        self._devs = {"a_to_b": (self.ns_a, dev_a), "b_to_a": (self.ns_b, dev_b)}
        self._base: dict[str, dict[str, int]] = {}

    def shape(self, settings: LinkSettings) -> None:
        run_cmd(netem_argv(*self._devs["a_to_b"], settings.a_to_b, mtu=self._mtu, min_packet=self._mtu))
        # the ACK direction carries small packets: size its packet limit for 64-byte ACKs
        run_cmd(netem_argv(*self._devs["b_to_a"], settings.b_to_a, mtu=self._mtu, min_packet=64))
        self._base = {}
        self.reset_stats()

    def _raw(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key, (ns, dev) in self._devs.items():
            qdiscs = json.loads(run_cmd(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev]))
            q = next(q for q in qdiscs if q.get("kind") == "netem")
            out[key] = {
                k: int(q.get(k, 0)) for k in ("packets", "bytes", "drops", "overlimits", "backlog", "qlen")
            }
        return out

    def reset_stats(self) -> None:
        self._base = self._raw()

    def stats(self) -> dict[str, Any]:
        raw = self._raw()
        result: dict[str, Any] = {}
        for key, now in raw.items():
            base = self._base.get(key, {})
            sent = now["packets"] - base.get("packets", 0)
            drops = now["drops"] - base.get("drops", 0)
            result[key] = {
                "packets_in": sent + drops + now["qlen"],
                "packets_out": sent,
                "bytes_out": now["bytes"] - base.get("bytes", 0),
                "drops": drops,
                "drop_loss": None,
                "drop_queue": None,
                "queue_peak_bytes": None,
                "in_flight": now["qlen"],
            }
        return result

    def close(self) -> None:
        pass


def netem_available() -> tuple[bool, str]:
    """Whether ``tc qdisc ... netem`` works here; the reason when it does not."""
    with Sandbox() as probe:
        try:
            ns = probe.add_netns("p")
            run_cmd(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        except BenchSetupError as exc:
            return False, str(exc)
    return True, ""


def open_link(
    kind: str, sandbox: Sandbox, *, mtu: int = 1500, seed: int = 1, rt_priority: int = 0
) -> LinkEmulator:
    """Build the emulator named ``kind`` (``auto``: netem where it works, else tun).

    ``rt_priority`` > 0 runs the userspace forwarder SCHED_FIFO at that priority (ignored by netem).
    """
    if kind == "auto":
        kind = "netem" if netem_available()[0] else "tun"
    if kind == "netem":
        ok, why = netem_available()
        if not ok:
            raise BenchSetupError(f"netem is not available here: {why}")
        return NetemLink(sandbox, mtu=mtu, seed=seed)
    if kind == "tun":
        return TunLink(sandbox, mtu=mtu, seed=seed, rt_priority=rt_priority)
    raise UnknownPluginError("link emulator", kind, ["auto", "netem", "tun"])
