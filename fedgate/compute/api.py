"""The HE backend interface, its statistics snapshot and the backend registry.

Rules of this module:

1. A backend is anything that satisfies :class:`HeBackend`: batch ``encrypt / decrypt / add /
   mul_scalar / powm`` on :class:`~fedgate.compute.limbs.LimbBuffer` s. Plaintexts are residues mod n
   (``pk.plain_width`` limbs), ciphertexts residues mod n^2 (``pk.cipher_width`` limbs). Signed and
   fixed-point values are the caller's business (:mod:`fedgate.compute.encoding`).
2. Every backend passes :func:`fedgate.compute.testing.check_backend`.
3. The registry (:data:`K_BACKENDS`) names each backend by import string; a backend module is imported
   only when it is selected, so CuPy or a vendor library is never loaded by accident. ``auto`` picks
   ``gpu`` when CuPy sees a device and ``cpu`` otherwise. An unknown name raises
   :class:`~fedgate.errors.UnknownPluginError` listing the valid names.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from fedgate.compute.config import ComputeConfig
from fedgate.compute.limbs import LimbBuffer
from fedgate.compute.paillier import PublicKey, SecretKey
from fedgate.errors import ConfigError, InvalidRequestError, LocalError, UnknownPluginError

__all__ = [
    "K_BACKENDS",
    "BackendFactory",
    "BackendStats",
    "HeBackend",
    "backend_names",
    "check_same_count",
    "check_width",
    "create_backend",
    "resolve_backend_name",
]


def check_width(buf: LimbBuffer, width: int, what: str) -> None:
    """A request's buffer must have the key's limb width; every backend checks its inputs with this."""
    if buf.width != width:
        raise InvalidRequestError(f"{what} must have {width} limbs per element, got {buf.width}")


def check_same_count(a: LimbBuffer, b: LimbBuffer) -> None:
    """Element-wise operations take two batches of the same size."""
    if a.count != b.count:
        raise InvalidRequestError(f"batch sizes differ: {a.count} != {b.count}")


@dataclass(frozen=True, slots=True)
class BackendStats:
    """A frozen snapshot of a backend's counters."""

    name: str
    """Backend name."""
    device: str
    """What runs the arithmetic (``gmpy2 x 16 processes``, ``NVIDIA H100``, ...)."""
    encrypted: int
    """Ciphertexts produced by ``encrypt``."""
    decrypted: int
    """Ciphertexts decrypted."""
    evaluated: int
    """Elements through ``add``, ``mul_scalar`` and ``powm``."""
    pool_served: int
    """r^n values taken from precomputed pools."""


@runtime_checkable
class HeBackend(Protocol):
    """Batch Paillier arithmetic on fixed-width little-endian limb buffers."""

    @property
    def name(self) -> str:
        """Registry name of the backend."""
        ...

    def encrypt(
        self, pk: PublicKey, plaintexts: LimbBuffer, *, sk: SecretKey | None = None, obfuscate: bool = True
    ) -> LimbBuffer:
        """Encrypt residues mod n; with ``sk`` the owner's fast paths may be used; fresh r each element."""
        ...

    def decrypt(self, sk: SecretKey, ciphertexts: LimbBuffer) -> LimbBuffer:
        """Decrypt to residues mod n (CRT)."""
        ...

    def add(self, pk: PublicKey, a: LimbBuffer, b: LimbBuffer) -> LimbBuffer:
        """Element-wise homomorphic addition."""
        ...

    def mul_scalar(self, pk: PublicKey, ciphertexts: LimbBuffer, scalars: LimbBuffer) -> LimbBuffer:
        """Element-wise multiplication by plaintext residues mod n (above n/2 means negative).

        For k <= n/2 the result is exactly c^k mod n^2; above, any valid encryption of k*m.
        """
        ...

    def powm(self, base: LimbBuffer, exponent: LimbBuffer, modulus: int) -> LimbBuffer:
        """Element-wise base^exponent mod an odd modulus (output has the base's width)."""
        ...

    def statistics(self) -> BackendStats:
        """A snapshot of the counters."""
        ...

    def close(self) -> None:
        """Release processes and device memory."""
        ...


class BackendFactory(Protocol):
    """Builds a backend from its config slice."""

    def __call__(self, config: ComputeConfig) -> HeBackend: ...


# name -> "module:factory"; imported only when selected; read-only.
K_BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "cpu": "fedgate.compute.cpu:create",
        "gpu": "fedgate.compute.gpu:create",
        "fpga": "fedgate.compute.fpga:create",
    }
)


def backend_names() -> list[str]:
    """Valid backend names, ``auto`` included."""
    return sorted([*K_BACKENDS, "auto"])


def _gpu_present() -> bool:
    try:
        gpu = importlib.import_module("fedgate.compute.gpu")
    except ImportError:
        return False
    return bool(gpu.device_available())


def resolve_backend_name(name: str) -> str:
    """Map ``auto`` to a concrete backend; reject unknown names."""
    if name == "auto":
        return "gpu" if _gpu_present() else "cpu"
    if name not in K_BACKENDS:
        raise UnknownPluginError("HE backend", name, backend_names(), path="compute.backend")
    return name


def create_backend(config: ComputeConfig, name: str | None = None) -> HeBackend:
    """Import and build the backend ``name`` (default ``config.backend``)."""
    chosen = resolve_backend_name(name or config.backend)
    module_name, _, attr = K_BACKENDS[chosen].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"HE backend {chosen!r} cannot be loaded: {exc}", path="compute.backend") from exc
    factory: BackendFactory = getattr(module, attr)
    backend = factory(config)
    if not isinstance(backend, HeBackend):
        raise LocalError(f"HE backend {chosen!r} does not implement HeBackend")
    return backend
