"""The ``[quic]`` configuration section (owned by the congestion package).

Rules of this module: pure data and validation; the controller name is checked against the registry
when the section is built, so a typo fails at config load with the valid names listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedgate.configtree import bounds
from fedgate.congestion import check_controller_name

__all__ = ["QuicConfig"]

K_MIB = 1024 * 1024  # bytes


@dataclass(frozen=True, slots=True)
class QuicConfig:
    """QUIC carrier settings."""

    congestion_control: str = "ltbbr"
    """Name of the congestion controller (see ``fedgate.congestion.K_CONTROLLERS``)."""
    max_datagram_size: int = field(default=1452, metadata=bounds(ge=1200, le=65527))
    """Largest UDP payload sent, bytes (1452 fits a 1500-byte MTU with IPv4/IPv6 headers)."""
    idle_timeout_s: float = field(default=30.0, metadata=bounds(gt=0))
    """A connection with no packet from the peer for this long is closed, seconds."""
    keepalive_s: float = field(default=5.0, metadata=bounds(gt=0))
    """A PING is sent after this many idle seconds, so NATs and the idle timer stay fresh."""
    max_data_bytes: int = field(default=64 * K_MIB, metadata=bounds(ge=64 * 1024))
    """Connection flow-control window, bytes; keep it >= 2x the path's bandwidth-delay product."""
    max_stream_data_bytes: int = field(default=64 * K_MIB, metadata=bounds(ge=64 * 1024))
    """Per-stream flow-control window, bytes; keep it >= 2x the bandwidth-delay product."""
    pacer_bucket_s: float = field(default=0.004, metadata=bounds(ge=0.001, le=0.1))
    """Pacer burst allowance, seconds of data at the pacing rate (>= 2 ms beats timer granularity)."""
    send_buffer_bytes: int = field(default=4 * K_MIB, metadata=bounds(ge=64 * 1024))
    """Bytes a channel queues in the QUIC stream before ``send`` waits, bytes."""
    initial_rtt_s: float = field(default=0.1, metadata=bounds(gt=0, le=10))
    """RTT assumed before the first sample, seconds."""
    workers: int = field(default=0, metadata=bounds(ge=0, le=16))
    """QUIC worker processes (0: QUIC runs in the gateway process). One core carries about 100 Mbit/s
    of QUIC; with N workers, inbound connections spread over them (one UDP port, steered by
    connection id) and outbound lanes (``link.lanes_per_peer``) too."""
    qlog_dir: str = ""
    """Directory for qlog-style JSON traces, one file per connection; empty disables tracing."""
    qlog_peers: tuple[str, ...] = ()
    """Party ids (or ``host:port``) whose connections are traced; empty = all, when qlog_dir is set."""

    def __post_init__(self) -> None:
        check_controller_name(self.congestion_control, path="quic.congestion_control")
