"""The ``[quic]`` configuration section (owned by the congestion package)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QuicConfig"]


@dataclass(frozen=True, slots=True)
class QuicConfig:
    """QUIC carrier settings."""

    congestion_control: str = "ltbbr"
    """Name of the congestion controller (see ``fedgate.congestion``)."""
