"""Controller benchmark in virtual time: the WAN seed rows through the bottleneck simulator.

Usage::

    python -m fedgate.congestion.sim_bench [--rate 100] [--duration 30] [--cc ltbbr,newreno] [--flows 1]

Rules of this module:

1. Pure computation (the simulator's virtual time): the figures do not depend on CPU load, so they
   isolate the controller from the QUIC stack and the host. ``fedgate bench wan`` measures the real
   thing end to end.
2. Every row runs every controller in the same command; figures are ratios against the physical
   limit (bottleneck x (1 - loss)), and the first controller listed is the baseline of the
   ``x base`` column.
3. Output: one table on stdout, and with ``--json PATH`` the raw figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from fedgate.congestion import check_controller_name
from fedgate.congestion.sim import FlowSpec, LinkSpec, Simulation
from fedgate.errors import ConfigError

__all__ = ["K_SEED_ROWS", "RowResult", "main", "run_row"]

K_SEED_ROWS = ((0.020, 0.0001), (0.040, 0.001), (0.080, 0.01), (0.160, 0.02), (0.320, 0.04), (0.320, 0.10))
"""(RTT seconds, loss probability) of the seed's six rows."""
K_PACKET = 1452  # bytes per simulated datagram (the carrier's default)
K_FLOW_STAGGER = 0.01  # seconds between the starts of parallel flows


@dataclass(frozen=True, slots=True)
class RowResult:
    cc: str
    rtt: float
    """Seconds."""
    loss: float
    share_of_limit: float
    """Goodput over the whole run (startup included) / physical limit."""
    overflow: float
    """Queue-overflow drops / packets sent (self-inflicted loss)."""
    congestion_events: int


def run_row(cc: str, *, rate_mbit: float, rtt: float, loss: float, duration: float, flows: int, seed: int) -> RowResult:
    factory = check_controller_name(cc, path="--cc")
    link = LinkSpec(rate_bps=rate_mbit * 1e6, rtt=rtt, loss=loss)
    specs = [FlowSpec(controller=factory, start=i * K_FLOW_STAGGER, packet_size=K_PACKET) for i in range(flows)]
    result = Simulation(link, specs, seed=seed).run(duration)
    goodput = sum(f.goodput(0.0, duration) for f in result.flows)
    return RowResult(
        cc=cc,
        rtt=rtt,
        loss=loss,
        share_of_limit=goodput / (link.rate * (1 - loss)),
        overflow=result.overflow_fraction,
        congestion_events=sum(c.statistics().congestion_events for c in result.controllers),
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedgate.congestion.sim_bench", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=100.0, metavar="MBIT", help="bottleneck (default 100)")
    p.add_argument("--duration", type=float, default=30.0, metavar="S", help="virtual seconds per run (default 30)")
    p.add_argument("--cc", default="newreno,ltbbr", help="controllers; the first is the baseline")
    p.add_argument("--flows", type=int, default=1, help="parallel flows of the same controller (default 1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    names = [n.strip() for n in args.cc.split(",") if n.strip()]
    try:
        for name in names:
            check_controller_name(name, path="--cc")
        if args.flows < 1:
            raise ConfigError("must be >= 1", path="--flows")
    except ConfigError as exc:
        print(f"sim_bench: {exc}", file=sys.stderr)
        return 2
    results: list[RowResult] = []
    print(f"{'row':>12}  {'cc':<8} {'%limit':>7} {'x base':>7} {'overflow%':>9} {'cong.ev':>7}")
    for rtt, loss in K_SEED_ROWS:
        base: float | None = None
        for name in names:
            r = run_row(name, rate_mbit=args.rate, rtt=rtt, loss=loss, duration=args.duration, flows=args.flows,
                        seed=args.seed)
            results.append(r)
            base = r.share_of_limit if base is None else base
            ratio = r.share_of_limit / base if base > 0 else float("inf")
            row = f"{rtt * 1000:.0f}ms/{loss * 100:g}%"
            print(f"{row:>12}  {name:<8} {100 * r.share_of_limit:6.1f}% {ratio:6.2f}x {100 * r.overflow:8.3f}% "
                  f"{r.congestion_events:7d}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
