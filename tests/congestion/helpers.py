"""Scenario helpers for the congestion tests: virtual-time runs over the pure simulator."""

from __future__ import annotations

from fedgate.congestion import CongestionControllerFactory
from fedgate.congestion.sim import FlowSpec, LinkSpec, SimResult, Simulation

K_RATE_BPS = 10e6  # bits per second: small enough that a 30 s scenario simulates in well under a second


def run_single(
    factory: CongestionControllerFactory,
    *,
    rtt: float,
    loss: float = 0.0,
    duration: float = 20.0,
    rate_bps: float = K_RATE_BPS,
    queue_bytes: int | None = None,
    seed: int = 1,
) -> tuple[LinkSpec, SimResult]:
    link = LinkSpec(rate_bps=rate_bps, rtt=rtt, loss=loss, queue_bytes=queue_bytes)
    return link, Simulation(link, [FlowSpec(controller=factory)], seed=seed).run(duration)


def limit(link: LinkSpec) -> float:
    """The physical goodput limit, bytes per second: bottleneck x (1 - loss)."""
    return link.rate * (1 - link.loss)
