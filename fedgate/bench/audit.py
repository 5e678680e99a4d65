"""``fedgate bench audit``: what the audit chain and ledger cost the gateways on ``fedgate bench proxy``.

Runs the proxy benchmark's real gateway processes and cases (``fedgate bench proxy``: one gateway, the
OSX gRPC hop, the fedgate TCP link; 1 KiB and 1 MiB FATE-shaped messages that the default audit
policy passes) with three gateway pairs side by side, one per mode:

* ``off``: ``[audit] enabled = false``;
* ``chain``: the filter chain on every message, the ledger off;
* ``on``: the chain and the ledger (every message hashed, chained and committed in batches): the
  shipped ``[audit]`` defaults;
* ``acked`` (only when named in ``--modes``): ``on`` with ``ledger_ack_after_commit = true``, a
  message acknowledged only once its ledger record is committed.

Every case (path, size) is measured in each mode back to back, ``--rounds`` times, the order of the
modes rotating each round, so that the modes of one round meet the same load on a shared machine.
The figure is the gateways' CPU time per message: ``utime + stime`` of both gateway processes of the
mode (all threads) from ``/proc/<pid>/stat``, read just before and after each case, so start-up,
route reloads, warm-up and the other modes' work are not counted; divided by the case's messages.
Unlike msg/s, CPU time stays meaningful on a machine shared with other jobs. Each round gives one
ratio per mode against that round's ``off`` figure; the table shows the median over rounds and the
spread (min..max) of the per-message figures and of those paired ratios.

``--micro`` runs the in-process per-message micro-benchmark of the chain and the ledger instead
(``fedgate.audit.bench``: no gateways).

Rules: an adapter (processes, clocks, /proc); Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedgate.bench import proxy as bench_proxy

__all__ = ["main"]

K_MODES = ("off", "chain", "on", "acked")
K_DEFAULT_MODES = ("off", "chain", "on")
K_PATHS = (("one gateway", ""), ("two, grpc hop", "grpc"), ("two, tcp link", "tcp"))
K_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu(path: str) -> tuple[float, float]:
    """(utime, stime) seconds from a ``/proc/.../stat`` file."""
    with open(path, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) / K_TICK, int(fields[12]) / K_TICK  # fields 14 and 15 of proc(5)


def _children() -> list[int]:
    """Pids of this process's children (the gateways ``bench proxy`` started)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[1]) == me:
                    found.append(int(entry))
    return sorted(found)


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``: ``main`` (the event loop) and ``other`` (all the rest)."""
    out = {"main": 0.0, "other": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            user, system = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
            out["main" if int(tid) == pid else "other"] += user + system
    return out


@dataclass(slots=True)
class _Sample:
    """Gateway CPU of one case: user and system seconds, main-thread and other-thread seconds."""

    user: float = 0.0
    system: float = 0.0
    main: float = 0.0
    other: float = 0.0
    messages: int = 0
    rate: float = 0.0
    """msg/s of the case (wall clock; noisy on a shared machine)."""

    def add(self, before: dict[str, float], after: dict[str, float], messages: int) -> None:
        for name in ("user", "system", "main", "other"):
            setattr(self, name, getattr(self, name) + after[name] - before[name])
        self.messages += messages

    @property
    def per_message_us(self) -> float:
        return (self.user + self.system) / max(1, self.messages) * 1e6


def _snapshot(pids: Sequence[int]) -> dict[str, float]:
    total = {"user": 0.0, "system": 0.0, "main": 0.0, "other": 0.0}
    for pid in pids:
        user, system = _stat_cpu(f"/proc/{pid}/stat")
        total["user"] += user
        total["system"] += system
        for name, value in _threads(pid).items():
            total[name] += value
    return total


@dataclass(slots=True)
class _Run:
    """The figures of one mode in one round: CPU per (size label, path)."""

    mode: str
    cases: dict[tuple[str, str], _Sample] = field(default_factory=dict)

    def total(self, size: str) -> _Sample:
        out = _Sample()
        for (label, _), s in self.cases.items():
            if label == size:
                out.add({"user": 0, "system": 0, "main": 0, "other": 0},
                        {"user": s.user, "system": s.system, "main": s.main, "other": s.other}, s.messages)
        return out


@dataclass(frozen=True, slots=True)
class _Pair:
    """One running gateway pair (A, B) in one audit mode."""

    mode: str
    a: int
    b: int
    use: Callable[[str], None]
    pids: tuple[int, ...]


def _case(pair: _Pair, path: str, transport: str, size: int, count: int, concurrency: int, tries: int = 3) -> _Sample:
    """One measured case; a case whose gateways lose or stall a message (bench proxy exits) is said and redone."""
    pop_port, target = (pair.a, "9999") if not transport else (pair.b, "10000")
    for attempt in range(1, tries + 1):
        sample = _Sample()
        before = _snapshot(pair.pids)
        try:
            result = asyncio.run(bench_proxy._run_case(pair.a, pop_port, target=target, path=path, size=size,
                                                       count=count, concurrency=concurrency))
        except SystemExit as exc:
            if attempt == tries:
                raise
            print(f"case {pair.mode} {path} {size} (gateways {pair.pids}) failed ({exc}); running it again",
                  file=sys.stderr, flush=True)
            continue
        sample.add(before, _snapshot(pair.pids), result.messages)
        sample.rate = result.msg_per_s
        return sample
    raise AssertionError("unreachable")


def _measure(modes: Sequence[str], rounds: int, counts: dict[str, int], *, concurrency: int,
             warmup: int) -> list[_Run]:
    """All modes' gateway pairs run side by side; every case is measured mode after mode (the order
    rotates each round), so the modes of one round see the same load on a shared machine."""
    runs = {(mode, i): _Run(mode) for mode in modes for i in range(rounds)}
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-audit-") as tmp, contextlib.ExitStack() as stack:
        pairs: dict[str, _Pair] = {}
        for mode in modes:
            before = set(_children())
            root = pathlib.Path(tmp) / mode
            root.mkdir()
            a, b, use = stack.enter_context(bench_proxy._gateways(root, audit=mode))
            pids = tuple(sorted(set(_children()) - before))
            if len(pids) != 2:
                raise SystemExit(f"bench audit: expected 2 new gateway processes, found {pids}")
            pairs[mode] = _Pair(mode, a, b, use, pids)
        for path, transport in K_PATHS:
            for pair in pairs.values():
                if transport:
                    pair.use(transport)
                if warmup:
                    _case(pair, path, transport, 1024, warmup, concurrency)
            for i in range(rounds):
                order = [*modes[i % len(modes):], *modes[: i % len(modes)]]  # no mode always runs first
                for label, size in bench_proxy.K_SIZES.items():
                    for mode in order:
                        sample = _case(pairs[mode], path, transport, size, counts[label], concurrency)
                        runs[(mode, i)].cases[(label, path)] = sample
                print(f"{path}: round {i + 1}/{rounds} " + "  ".join(
                    f"{m} {runs[(m, i)].cases[('1KiB', path)].per_message_us:5.0f}/"
                    f"{runs[(m, i)].cases[('1MiB', path)].per_message_us:6.0f}" for m in modes)
                    + "  us/msg 1KiB/1MiB", flush=True)
    return [runs[(mode, i)] for i in range(rounds) for mode in modes]


def _spread(values: Sequence[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}..{format(max(values), fmt)})"


def _report(runs: list[_Run], modes: Sequence[str]) -> dict[str, object]:
    stream = sys.stdout
    by_mode = {m: [r for r in runs if r.mode == m] for m in modes}
    rounds = min(len(v) for v in by_mode.values())
    summary: dict[str, object] = {"rounds": rounds, "sizes": {}}
    print(f"\ngateway CPU per message (both gateways, utime+stime from /proc, {rounds} interleaved rounds)",
          file=stream)
    print("median (min..max) over rounds; ratios are paired per round against that round's audit-off run",
          file=stream)
    for label in bench_proxy.K_SIZES:
        per_mode = {m: [r.total(label) for r in by_mode[m][:rounds]] for m in modes}
        us = {m: [s.per_message_us for s in per_mode[m]] for m in modes}
        print(f"\n{label}: {per_mode['off'][0].messages} messages per mode per round (3 paths)", file=stream)
        print(f"  {'mode':<6} {'us/message':>28} {'ratio vs off':>26} {'user/sys us':>14} {'main/other us':>14}",
              file=stream)
        sizes: dict[str, object] = {}
        for m in modes:
            ratios = [x / o for x, o in zip(us[m], us["off"], strict=True)]
            n = [s.messages for s in per_mode[m]]
            user = statistics.median(s.user / k * 1e6 for s, k in zip(per_mode[m], n, strict=True))
            system = statistics.median(s.system / k * 1e6 for s, k in zip(per_mode[m], n, strict=True))
            main = statistics.median(s.main / k * 1e6 for s, k in zip(per_mode[m], n, strict=True))
            other = statistics.median(s.other / k * 1e6 for s, k in zip(per_mode[m], n, strict=True))
            print(f"  {m:<6} {_spread(us[m], '.0f'):>28} {_spread(ratios, '.3f'):>26} {user:6.0f}/{system:<7.0f}"
                  f" {main:6.0f}/{other:<7.0f}", file=stream)
            sizes[m] = {"us_per_message": us[m], "ratio_vs_off": ratios,
                        "median_us": statistics.median(us[m]), "median_ratio": statistics.median(ratios)}
        by_path = "  per path, median us/message:"
        for path, _ in K_PATHS:
            vals = {m: statistics.median(r.cases[(label, path)].per_message_us for r in by_mode[m][:rounds])
                    for m in modes}
            by_path += f"  [{path}] " + " / ".join(f"{vals[m]:.0f}" for m in modes)
        print(by_path + f"  ({' / '.join(modes)})", file=stream)
        summary["sizes"][label] = sizes  # type: ignore[index]
    return summary


def main(argv: Sequence[str]) -> int:
    if "--micro" in argv:
        from fedgate.audit import bench as micro

        return micro.main([a for a in argv if a != "--micro"])
    parser = argparse.ArgumentParser(prog="fedgate bench audit", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of off/chain/on (default: %(default)s)")
    parser.add_argument("--count-1k", type=int, default=1000, help="1 KiB messages per path (default: %(default)s)")
    parser.add_argument("--count-1m", type=int, default=60, help="1 MiB messages per path (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="pushers and poppers (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=50,
                        help="unmeasured 1 KiB messages per path (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(K_DEFAULT_MODES),
                        help=f"modes to run, of {','.join(K_MODES)} (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--micro", action="store_true",
                        help="run the in-process per-message micro-benchmark instead (fedgate.audit.bench; "
                        "--micro --help for its options)")
    args = parser.parse_args(argv)
    if not os.path.isdir("/proc/self/task"):
        raise SystemExit("bench audit: needs Linux /proc")
    modes = tuple(m for m in args.modes.split(",") if m)
    if "off" not in modes or any(m not in K_MODES for m in modes):
        parser.error(f"--modes: a comma list of {', '.join(K_MODES)} that includes off")
    counts = {"1KiB": args.count_1k, "1MiB": args.count_1m}
    runs = _measure(modes, args.rounds, counts, concurrency=args.concurrency, warmup=args.warmup)
    summary = _report(runs, modes)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0
