"""``fedgate bench wan``: goodput of kernel TCP and fedgate transports over emulated lossy, long links.

Example (the six seed rows at a 100 Mbit/s bottleneck, 20 s per transfer)::

    fedgate bench wan --rate 100 --duration 20 --transports kernel-cubic,kernel-bbr --out var/wan

Rules of this module:

1. One run = one :class:`~fedgate.bench._sandbox.Sandbox` (two namespaces, one emulated link) reshaped
   row by row; every transport of a row runs through the same link, one after the other, never together.
2. Cleanup always happens: the sandbox is closed in ``finally``; SIGTERM and SIGHUP are turned into an
   exception like Ctrl-C, and a second Ctrl-C during cleanup is ignored. Partial results are still
   printed and written.
3. The userspace emulator's ceiling is measured first (an unshaped kernel-CUBIC transfer); rows whose
   bottleneck exceeds K_CEILING_SHARE of it get a warning, and every transfer is checked against the
   emulator's own counters (saturation, lateness, random drops vs. the setting, drops outside it).
4. Only pids this run started are signalled (the sandbox tracks them).
5. The userspace emulator delivers on a tick of ``--emu-tick-us`` (default 250 us), mean delay kept:
   per-packet wake-ups of the real-time emulator would otherwise preempt the endpoints thousands of
   times a second (``fedgate.bench._emucore`` rule 5). The tick is in the JSON (``emulator``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import IO, Any

from fedgate.bench._emucore import DirectionShape
from fedgate.bench._links import LinkEmulator, open_link
from fedgate.bench._matrix import (
    SEED_ROWS,
    LinkRow,
    LinkSettings,
    link_settings,
    load_rows_file,
    parse_row,
    physical_limit_mbit,
)
from fedgate.bench._report import (
    PlotUnavailableError,
    TransferResult,
    format_table,
    loss_check,
    progress_line,
    write_plot,
)
from fedgate.bench._sandbox import BenchSetupError, Sandbox, remove_stale, wait_listening
from fedgate.bench._transports import TransportRunner, availability, build_transports, select_transports
from fedgate.errors import ConfigError

__all__ = ["main"]

K_PORT_BASE = 21000  # first TCP/UDP port used for transfers (one new port per transfer)
K_LISTEN_TIMEOUT = 15.0  # seconds for a server to bind its port
K_HANG_GRACE = 20.0  # seconds past the duration (plus 4 RTTs) before a transfer counts as hung
K_POLL = 0.25  # seconds between progress updates
K_CEILING_SHARE = 0.8  # a row's bottleneck above this share of the measured ceiling gets a warning
K_SATURATED = 0.85  # forwarder CPU busy share that marks a transfer emulator-limited
K_LATE_MEAN = 0.001  # seconds of mean delivery lateness that marks a transfer as distorted
K_HOST_BUSY = 0.9  # host CPU busy share that marks a transfer as possibly CPU-bound
K_RT_PRIORITY = 10  # SCHED_FIFO priority of the userspace forwarder by default
K_EMU_TICK_US = 250.0  # microseconds: the userspace emulator's delivery tick (_emucore rule 5)
K_EMU_TICK_MAX_US = 10_000.0  # microseconds: the largest tick DirectionShape accepts
K_RTT_PROBES = 10  # UDP probes per row for the RTT check
K_RTT_TOLERANCE = 2.0  # milliseconds a row's measured RTT may differ from its setting without a warning
K_LOSS_Z = 4.0  # standard deviations of random drops off the setting that earn a note


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (handled like Ctrl-C)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedgate bench wan",
        description="Goodput of kernel TCP and fedgate transports through an emulated lossy long link.",
    )
    p.add_argument("--rate", type=float, default=100.0, metavar="MBIT", help="bottleneck rate (default 100)")
    p.add_argument(
        "--duration", type=float, default=20.0, metavar="S", help="seconds per transfer (default 20)"
    )
    p.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="RTT_MS:LOSS_PCT[:RATE_MBIT]",
        help="a row to run (repeatable); default: the six seed rows",
    )
    p.add_argument("--rows-file", type=Path, metavar="TOML", help="rows from a file of [[row]] tables")
    p.add_argument(
        "--transports",
        default="kernel-cubic,kernel-bbr,fedgate-quic",
        help="comma-separated runner names (default: all)",
    )
    p.add_argument(
        "--list-transports", action="store_true", help="list runners and whether they can run here"
    )
    p.add_argument(
        "--emulator",
        choices=["auto", "netem", "tun"],
        default="auto",
        help="kernel netem or the userspace TUN emulator (auto: netem where it works)",
    )
    p.add_argument("--mtu", type=int, default=1500, help="link MTU in bytes (default 1500)")
    p.add_argument("--queue-bdp", type=float, default=1.0, help="bottleneck queue in BDPs (default 1)")
    p.add_argument("--data-loss-only", action="store_true", help="random loss on the data direction only")
    p.add_argument("--seed", type=int, default=1, help="seed of the emulator's loss draws")
    p.add_argument(
        "--emu-tick-us",
        type=float,
        default=K_EMU_TICK_US,
        metavar="US",
        help=f"userspace emulator: deliver on a grid of this many microseconds, mean delay kept "
        f"(default {K_EMU_TICK_US:g}, like a NIC moderating interrupts; 0: each packet when due)",
    )
    p.add_argument(
        "--rt-priority",
        type=int,
        default=K_RT_PRIORITY,
        help="SCHED_FIFO priority of the userspace emulator, so host load does not delay packets (0: normal)",
    )
    p.add_argument(
        "--calibrate",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds of the ceiling measurement (TUN emulator; 0 skips it)",
    )
    p.add_argument("--out", default="bench-wan", metavar="PREFIX", help="writes PREFIX.json and PREFIX.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_tick(args: argparse.Namespace) -> None:
    if not 0 <= args.emu_tick_us <= K_EMU_TICK_MAX_US:
        raise ConfigError(
            f"must be between 0 and {K_EMU_TICK_MAX_US:g}, got {args.emu_tick_us:g}", path="--emu-tick-us"
        )


def _rows(args: argparse.Namespace) -> list[LinkRow]:
    rows = [parse_row(text, rate_mbit=args.rate) for text in args.row]
    if args.rows_file is not None:
        rows += load_rows_file(args.rows_file, rate_mbit=args.rate)
    return rows or [LinkRow(rtt, loss, args.rate) for rtt, loss in SEED_ROWS]


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class _Progress:
    """A one-line progress bar on a terminal, sparse lines elsewhere."""

    def __init__(self, stream: IO[str], *, total_s: float, enabled: bool) -> None:
        self.stream = stream
        self.total_s = total_s
        self.done_s = 0.0
        self.enabled = enabled
        self.tty = stream.isatty()

    def update(self, current_s: float, label: str) -> None:
        if self.enabled and self.tty:
            line = progress_line(self.done_s + current_s, self.total_s, label)
            self.stream.write("\r" + line[:120].ljust(120))
            self.stream.flush()

    def step(self, seconds: float, label: str) -> None:
        self.done_s += seconds
        if self.enabled and not self.tty:
            self.stream.write(progress_line(self.done_s, self.total_s, label) + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.tty and self.enabled:
            self.stream.write("\r" + " " * 120 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def _last_json(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return text.splitlines()[-1][:200] if text else ""


class _Harness:
    """One run: the sandbox, its link, the port counter and the progress bar."""

    def __init__(
        self, sandbox: Sandbox, link: LinkEmulator, workdir: Path, progress: _Progress, mtu: int
    ) -> None:
        self.sandbox = sandbox
        self.link = link
        self.workdir = workdir
        self.progress = progress
        self.mtu = mtu
        self.port = K_PORT_BASE
        self.ceiling_mbit: float | None = None
        self.rt_priority = 0  # SCHED_FIFO priority of the RTT probes (the run's --rt-priority)

    def transfer(
        self, runner: TransportRunner, row: LinkRow, *, duration: float, label: str = ""
    ) -> TransferResult:
        """Run one transfer through the link as shaped now; never raises for a failed transfer."""
        label = label or f"{row.name} {runner.name}"
        self.port += 1
        tag = f"{self.port}-{runner.name}"
        listen = f"{self.link.addr_b}:{self.port}"
        limit = physical_limit_mbit(row, payload_share=runner.payload_share(self.mtu))
        with contextlib.ExitStack() as stack:
            files = {
                k: stack.enter_context(open(self.workdir / f"{tag}.{k}", "w"))
                for k in ("srv.out", "srv.err", "cli.out", "cli.err")
            }
            server = self.sandbox.spawn(
                runner.server_argv(listen),
                netns=self.link.ns_b,
                stdout=files["srv.out"],
                stderr=files["srv.err"],
            )
            if not wait_listening(server.pid, self.port, proto=runner.proto, timeout=K_LISTEN_TIMEOUT):
                self.sandbox.stop(server)
                err = _tail(self.workdir / f"{tag}.srv.err") or "did not listen"
                return TransferResult(runner.name, row, 0.0, limit, 0.0, 0, 0, error=f"server: {err}")
            self.link.reset_stats()
            cpu0 = _cpu_times()
            client = self.sandbox.spawn(
                runner.client_argv(listen, duration=duration),
                netns=self.link.ns_a,
                stdout=files["cli.out"],
                stderr=files["cli.err"],
            )
            t0 = time.monotonic()
            hard = t0 + duration + K_HANG_GRACE + 4 * row.rtt_ms / 1000
            while (server.poll() is None or client.poll() is None) and time.monotonic() < hard:
                elapsed = time.monotonic() - t0
                self.progress.update(min(elapsed, duration), f"{label} {elapsed:4.0f}/{duration:g}s")
                time.sleep(K_POLL)
            hung = [name for name, p in (("server", server), ("client", client)) if p.poll() is None]
            for p in (server, client):
                self.sandbox.stop(p)
            cpu1 = _cpu_times()
            emu = self.link.stats()
        self.progress.step(duration, f"{label} done")
        srv, cli = _last_json(self.workdir / f"{tag}.srv.out"), _last_json(self.workdir / f"{tag}.cli.out")
        busy = (cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1])
        error = ""
        if hung:
            error = f"{' and '.join(hung)} did not finish within {hard - t0:.0f} s"
        elif "bytes" not in srv or "seconds" not in srv:
            error = f"server: {srv.get('error') or _tail(self.workdir / f'{tag}.srv.err') or 'no JSON line'}"
        seconds = float(srv.get("seconds", 0.0))
        goodput = 8e-6 * int(srv.get("bytes", 0)) / seconds if seconds > 0 and not error else 0.0
        result = TransferResult(
            transport=runner.name,
            row=row,
            goodput_mbit=goodput,
            limit_mbit=limit,
            seconds=seconds,
            packets_sent=int(cli.get("packets_sent", 0)),
            packets_lost=int(cli.get("packets_lost", 0)),
            emulator=emu,
            host_cpu_busy=busy,
            client=cli,
            server=srv,
            error=error,
        )
        return _with_notes(result, ceiling_mbit=self.ceiling_mbit)

    def check_rtt(self, row: LinkRow) -> dict[str, Any]:
        """Ping through the link as shaped now: median RTT of K_RTT_PROBES UDP probes vs the setting."""
        self.port += 1
        target = f"{self.link.addr_b}:{self.port}"
        wait = 2 * row.rtt_ms / 1000 + 1.0
        echo = self.sandbox.python(
            "fedgate.bench.udp_probe",
            ["echo", "--listen", target, "--idle", str(wait + 2)],
            netns=self.link.ns_b,
            rt_priority=self.rt_priority,
        )
        ping_args = ["ping", "--connect", target, "--count", str(K_RTT_PROBES), "--interval", "0.005"]
        try:
            if not wait_listening(echo.pid, self.port, proto="udp", timeout=K_LISTEN_TIMEOUT):
                return {"setting_ms": row.rtt_ms, "error": "echo server did not start"}
            ping = self.sandbox.python(
                "fedgate.bench.udp_probe",
                [*ping_args, "--wait", str(wait)],
                netns=self.link.ns_a,
                rt_priority=self.rt_priority,
            )
            out, _ = ping.communicate(timeout=wait + 10)
        finally:
            self.sandbox.stop(echo)
        rtts = sorted(r for r in json.loads(out.strip().splitlines()[-1])["rtts_ms"] if r is not None)
        median = statistics.median(rtts) if rtts else None
        return {"setting_ms": row.rtt_ms, "median_ms": median, "received": len(rtts), "sent": K_RTT_PROBES}

    def calibrate(self, runner: TransportRunner, *, seconds: float) -> dict[str, Any]:
        """Measure the emulator's ceiling with an unshaped transfer."""
        unshaped = LinkSettings(DirectionShape(), DirectionShape())
        self.link.shape(unshaped)
        probe = LinkRow(0.0, 0.0, 0.0)
        r = self.transfer(runner, probe, duration=seconds, label="ceiling measurement")
        data = r.emulator.get("a_to_b", {})
        wall = float(r.emulator.get("wall_s") or seconds)
        cpu = float(r.emulator.get("cpu_s") or 0.0)
        through = 8e-6 * int(data.get("bytes_out", 0)) / wall if wall > 0 else 0.0
        info = {
            "transport": runner.name,
            "seconds": seconds,
            "ip_mbit": through,
            "goodput_mbit": r.goodput_mbit,
            "packets_per_s": (
                int(data.get("packets_out", 0)) + int(r.emulator.get("b_to_a", {}).get("packets_out", 0))
            )
            / wall
            if wall > 0
            else 0.0,
            "forwarder_cpu_share": cpu / wall if wall > 0 else None,
            "cpu_bound_mbit": 8e-6 * int(data.get("bytes_out", 0)) / cpu if cpu > 0 else None,
            "host_cpu_busy": r.host_cpu_busy,
            "error": r.error,
        }
        self.ceiling_mbit = through if through > 0 and not r.error else None
        return info


def _with_notes(r: TransferResult, *, ceiling_mbit: float | None) -> TransferResult:
    """Attach warnings from the emulator's counters and the host's CPU load."""
    notes: list[str] = []
    emu = r.emulator
    wall, cpu = emu.get("wall_s"), emu.get("cpu_s")
    if wall and cpu is not None and cpu / wall > K_SATURATED:
        notes.append(f"emulator CPU {100 * cpu / wall:.0f}% busy: may be the bottleneck")
    for key in ("a_to_b", "b_to_a"):
        d = emu.get(key, {})
        if d.get("late_sum_s") is not None and d.get("packets_out"):
            mean = d["late_sum_s"] / d["packets_out"]
            if mean > K_LATE_MEAN:
                notes.append(f"{key} deliveries {1000 * mean:.1f} ms late on average (CPU contention?)")
    setting = r.row.loss_pct / 100
    drops, offered = r.data_dir("drop_loss"), r.data_dir("packets_in")
    if drops is not None and offered:
        z = loss_check(drops, offered, setting)
        if abs(z) > K_LOSS_Z:
            notes.append(
                f"random drops {100 * drops / offered:.3f}% vs setting {r.row.loss_pct:g}% (z={z:.1f})"
            )
    outside = sum(v for v in (emu.get("device_tx_dropped") or {}).values() if v)
    if outside:
        notes.append(f"{outside} packets dropped by the kernel before the emulator")
    if emu.get("write_errors"):
        notes.append(f"{emu['write_errors']} emulator write errors")
    if r.host_cpu_busy is not None and r.host_cpu_busy > K_HOST_BUSY:
        notes.append(f"host CPUs {100 * r.host_cpu_busy:.0f}% busy")
    if ceiling_mbit and r.row.rate_mbit > K_CEILING_SHARE * ceiling_mbit:
        notes.append(
            f"bottleneck above {100 * K_CEILING_SHARE:.0f}% of the emulator ceiling {ceiling_mbit:.0f}"
        )
    if r.client.get("cc") and r.transport.startswith("kernel-") and r.transport != f"kernel-{r.client['cc']}":
        notes.append(f"kernel used {r.client['cc']}")
    return dataclasses.replace(r, notes=tuple(notes))


@contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """SIGTERM/SIGHUP raise _Terminated while the run goes on; restored afterwards."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for old_sig, handler in previous.items():
            signal.signal(old_sig, handler)


def _shielded(fn: Callable[[], None]) -> None:
    """Run cleanup with Ctrl-C, SIGTERM and SIGHUP ignored, so a second one cannot interrupt it."""
    saved: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, signal.SIG_IGN)
    except ValueError:
        pass
    try:
        fn()
    finally:
        for old_sig, handler in saved.items():
            signal.signal(old_sig, handler)


def _list(registry: dict[str, TransportRunner]) -> int:
    for runner in registry.values():
        why = availability(runner)
        state = "available" if why is None else f"UNAVAILABLE: {why}"
        print(f"{runner.name:<14} {runner.description}  [{state}]")
    return 0


def main(argv: Sequence[str]) -> int:
    """``fedgate bench wan``; exit 0 when every transfer ran, 1 on a failed transfer, 2 on bad usage."""
    args = _parser().parse_args(argv)
    registry = build_transports()
    if args.list_transports:
        return _list(registry)
    try:
        _check_tick(args)
        rows = _rows(args)
        wanted = select_transports([n.strip() for n in args.transports.split(",") if n.strip()], registry)
    except ConfigError as exc:
        print(f"fedgate bench wan: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("fedgate bench wan: needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    unavailable = {r.name: why for r in wanted if (why := availability(r)) is not None}
    runners = [r for r in wanted if r.name not in unavailable]
    for name, why in unavailable.items():
        print(f"transport {name}: unavailable, skipped: {why}", file=sys.stderr)
    if not runners:
        print("fedgate bench wan: no transport can run here", file=sys.stderr)
        return 1
    total_s = len(rows) * len(runners) * args.duration
    progress = _Progress(sys.stderr, total_s=total_s + args.calibrate, enabled=not args.no_progress)
    results: list[TransferResult] = []
    doc: dict[str, Any] = {
        "command": ["fedgate", "bench", "wan", *argv],
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [asdict(r) for r in rows],
        "transports": {"run": [r.name for r in runners], "unavailable": unavailable},
    }
    status = 0
    sandbox = Sandbox()
    try:
        with _signals_as_exceptions(), tempfile.TemporaryDirectory(prefix="fgb-wan-") as tmp:
            stale = remove_stale()
            if stale:
                progress.message(f"removed stale namespaces of dead runs: {', '.join(stale)}")
            link = open_link(
                args.emulator, sandbox, mtu=args.mtu, seed=args.seed, rt_priority=args.rt_priority
            )
            sched = getattr(link, "sched", "kernel")
            tick = f"{args.emu_tick_us:g} us" if link.kind == "tun" else "kernel timers"
            doc["emulator"] = {"kind": link.kind, "sched": sched, "delivery_tick": tick}
            progress.message(
                f"emulator: {link.kind} ({link.ns_a} -> {link.ns_b}; scheduling: {sched}; delivery tick: {tick})"
            )
            harness = _Harness(sandbox, link, Path(tmp), progress, args.mtu)
            harness.rt_priority = args.rt_priority
            if link.kind == "tun" and args.calibrate > 0:
                calib = harness.calibrate(registry["kernel-cubic"], seconds=args.calibrate)
                doc["emulator"]["ceiling"] = calib
                progress.message(
                    f"emulator ceiling: {calib['ip_mbit']:.0f} Mbit/s of IP packets through the unshaped "
                    "link "
                    f"({calib['packets_per_s']:.0f} packets/s; forwarder CPU "
                    f"{100 * (calib['forwarder_cpu_share'] or 0):.0f}%, "
                    f"{calib['cpu_bound_mbit'] or 0:.0f} Mbit/s per CPU-second; host CPUs "
                    f"{100 * (calib['host_cpu_busy'] or 0):.0f}% busy)"
                )
                for row in rows:
                    if harness.ceiling_mbit and row.rate_mbit > K_CEILING_SHARE * harness.ceiling_mbit:
                        progress.message(
                            f"WARNING: row {row.name} at {row.rate_mbit:g} Mbit/s exceeds "
                            f"{100 * K_CEILING_SHARE:.0f}% of the emulator's ceiling; "
                            "it would measure the emulator"
                        )
            for row in rows:
                link.shape(
                    link_settings(
                        row,
                        queue_bdp=args.queue_bdp,
                        ack_loss=not args.data_loss_only,
                        tick_s=args.emu_tick_us * 1e-6,
                    )
                )
                check = harness.check_rtt(row)
                doc.setdefault("rtt_checks", []).append({"row": row.name, **check})
                median = check.get("median_ms")
                line = f"{row.name}: RTT {median if median is None else round(median, 2)} ms measured " + (
                    f"({check.get('received')}/{K_RTT_PROBES} probes) vs {row.rtt_ms:g} ms set"
                )
                if median is None or abs(median - row.rtt_ms) > K_RTT_TOLERANCE:
                    line = "WARNING: " + line
                progress.message(line)
                for runner in runners:
                    result = harness.transfer(runner, row, duration=args.duration)
                    results.append(result)
                    if result.error:
                        status = 1
                    progress.message(
                        f"{row.name:<14} {runner.name:<13} "
                        + (
                            f"FAILED: {result.error}"
                            if result.error
                            else f"{result.goodput_mbit:8.2f} Mbit/s ({result.pct_of_limit:.1f}% of limit)"
                        )
                    )
    except (KeyboardInterrupt, _Terminated) as exc:
        doc["interrupted"] = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM/SIGHUP"
        progress.message(f"interrupted ({doc['interrupted']}): cleaning up")
        status = 130 if isinstance(exc, KeyboardInterrupt) else 143
    except BenchSetupError as exc:
        progress.message(f"fedgate bench wan: {exc}")
        doc["error"] = str(exc)
        status = 1
    finally:
        _shielded(sandbox.close)
    doc["host"]["loadavg_end"] = os.getloadavg()
    doc["results"] = [r.as_dict() for r in results]
    print(format_table(results))
    out_json = Path(f"{args.out}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out_json}")
    if not args.no_plot and results:
        try:
            write_plot(results, Path(f"{args.out}.png"))
            print(f"wrote {args.out}.png")
        except PlotUnavailableError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
