"""The ``[compute]`` configuration section (owned by the compute package)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ComputeConfig"]


@dataclass(frozen=True, slots=True)
class ComputeConfig:
    """Paillier offload service settings."""

    enabled: bool = False
    """Serve the HE offload gRPC service."""
