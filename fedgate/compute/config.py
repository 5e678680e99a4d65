"""The ``[compute]`` configuration section (owned by the compute package).

Rules: every field has a default and a docstring with its unit; the backend name is checked here, at
config load (``Literal``), and again by the registry (:func:`fedgate.compute.create_backend`), which
raises :class:`~fedgate.errors.UnknownPluginError` listing the valid names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedgate.configtree import bounds

__all__ = ["BackendName", "ComputeConfig"]

BackendName = Literal["auto", "cpu", "gpu", "fpga"]


@dataclass(frozen=True, slots=True)
class ComputeConfig:
    """Paillier offload service settings."""

    enabled: bool = False
    """Serve the HE offload gRPC service."""
    backend: BackendName = "auto"
    """HE backend: ``cpu`` (gmpy2), ``gpu`` (CuPy), ``fpga`` (vendor card) or ``auto`` (gpu, else cpu)."""
    listen: str = "127.0.0.1:9390"
    """host:port of the offload gRPC service (local workers only; keep it on loopback or a private net)."""
    key_bits: int = field(default=2048, metadata=bounds(ge=1024, le=8192))
    """Modulus size in bits of keys the gateway generates (FATE's default is 1024, about 80-bit security)."""
    workers: int = field(default=0, metadata=bounds(ge=0, le=1024))
    """CPU worker processes for large batches; 0 means one per CPU core, 1 means in-process only."""
    parallel_min_batch: int = field(default=64, metadata=bounds(ge=1))
    """Batches shorter than this many elements run in-process (the pool's round trip would dominate)."""
    short_exponent: bool = True
    """Damgard-Jurik-Nielsen randomness r^n = hs^a with a short (bits/2) exponent a over a fixed-base table.
    Security rests on the DJN short-exponent assumption on top of DCR; set false for textbook r^n."""
    djn_window: int = field(default=0, metadata=bounds(ge=0, le=12))
    """Window of the DJN fixed-base table in bits; 0 picks 12 for 1024-bit and 9 for 2048-bit keys.
    Memory per key and process is about (bits/2 / window) * 2^window * 2*bits/8 bytes (55 MB at 1024, 33 MB at 2048)."""
    cpu_ifma: bool = True
    """Let the cpu backend use Intel crypto_mb (AVX-512 IFMA, 8 exponentiations per call) for
    decryption, scalar multiplication and non-DJN encryption when the CPU has avx512ifma (ipp-crypto is a
    runtime dependency on x86_64 Linux); otherwise gmpy2 does everything and the backend logs why."""
    pool_size: int = field(default=0, metadata=bounds(ge=0))
    """Precomputed r^n values kept per key for encryption (each used once, then dropped); 0 disables."""
    pool_low_water: float = field(default=0.5, metadata=bounds(ge=0, le=1))
    """Refill the randomness pool when it drops below this fraction of ``pool_size``."""
    shared_memory: bool = True
    """Accept batch payloads from same-host clients in shared memory (``/dev/shm`` files the client creates
    with mode 0600; the gRPC message then carries offsets only). Off: every payload travels in the message."""
    max_batch: int = field(default=1_000_000, metadata=bounds(ge=1))
    """Largest batch (elements) one service call may carry."""
    max_keys: int = field(default=64, metadata=bounds(ge=1))
    """Most keys the service holds at once."""
    gpu_device: int = field(default=0, metadata=bounds(ge=0))
    """CUDA device ordinal for the gpu backend."""
    fpga_library: str = ""
    """Path of the vendor's shared library for the fpga backend (ctypes); empty means not configured."""
    fpga_device: str = ""
    """Vendor device name or index passed to the fpga library (``software`` selects the CI emulator)."""
