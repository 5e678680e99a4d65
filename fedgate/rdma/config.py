"""The ``[rdma]`` configuration section (owned by the rdma package).

Rules of this module: pure data, no pyverbs; every field has a default and a docstring with units.
Both ends of a channel advertise their receive slots and slot size in the connection handshake, so
the two gateways need not use the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedgate.configtree import bounds

__all__ = ["RdmaConfig"]

K_KIB = 1024  # bytes
K_MIB = 1024 * 1024  # bytes


@dataclass(frozen=True, slots=True)
class RdmaConfig:
    """RDMA carrier settings."""

    device: str = ""
    """RDMA device name (``rxe0``, ``mlx5_0``); empty picks the first one present."""
    port_num: int = field(default=1, metadata=bounds(ge=1, le=255))
    """Port of the device to use (InfiniBand ports count from 1)."""
    gid_index: int = field(default=-1, metadata=bounds(ge=-1, le=65535))
    """GID table index; -1 picks an IPv4-mapped RoCE GID, else the first non-zero one."""
    recv_slots: int = field(default=64, metadata=bounds(ge=4, le=4096))
    """Pre-posted receive buffers per channel; the credit window the peer may fill."""
    slot_bytes: int = field(default=64 * K_KIB, metadata=bounds(ge=4 * K_KIB, le=16 * K_MIB))
    """Size of one receive/send slot in bytes; larger messages go by RDMA READ rendezvous."""
    read_chunk_bytes: int = field(default=1 * K_MIB, metadata=bounds(ge=4 * K_KIB, le=1024 * K_MIB))
    """Size of one RDMA READ work request of a rendezvous transfer, in bytes."""
    max_reads: int = field(default=8, metadata=bounds(ge=1, le=128))
    """RDMA READs in flight per channel (capped by the device's responder resources)."""
    max_rendezvous: int = field(default=4, metadata=bounds(ge=1, le=1024))
    """Large messages in flight per channel and direction (bounds the registered memory they pin)."""
    pool_cache_bytes: int = field(default=512 * K_MIB, metadata=bounds(ge=0))
    """Registered rendezvous buffers kept for reuse after release, in bytes (per carrier)."""
    completion_timeout_s: float = field(default=10.0, metadata=bounds(gt=0))
    """Seconds a posted SEND or READ may stay uncompleted before the peer is declared gone."""
    close_timeout_s: float = field(default=5.0, metadata=bounds(gt=0))
    """Seconds an orderly close waits for queued messages to drain before tearing down anyway."""
    retry_timeout: int = field(default=14, metadata=bounds(ge=1, le=31))
    """QP local ACK timeout exponent: 4.096 us * 2**n per try (14 is about 67 ms)."""
    retry_count: int = field(default=7, metadata=bounds(ge=0, le=7))
    """Transport retries before a work request fails with a retry-exceeded error."""
