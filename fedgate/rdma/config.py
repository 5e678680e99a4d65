"""The ``[rdma]`` configuration section (owned by the rdma package)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RdmaConfig"]


@dataclass(frozen=True, slots=True)
class RdmaConfig:
    """RDMA carrier settings."""

    device: str = ""
    """RDMA device name (``rxe0``, ``mlx5_0``); empty picks the first one present."""
