"""What the payload inspectors find: frozen event dataclasses, one per kind of finding.

Rules of this module:

1. Events are plain frozen data; they carry no bytes of the payload beyond short identifying values
   (a key's modulus size and fingerprint, a tensor's dtype, shape and statistics).
2. Inspectors (``pickle_scan``, ``safetensors_scan``, ``payload``) only ever *emit* these; the
   filters in ``filters`` judge them against the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ColumnStats",
    "EncryptedTensorFound",
    "Event",
    "GlobalImported",
    "KeyFound",
    "Malformed",
    "ScanLimit",
    "TensorFound",
]


@dataclass(frozen=True, slots=True)
class GlobalImported:
    """The pickle would import ``module.name`` (GLOBAL, STACK_GLOBAL, INST or an extension code)."""

    module: str
    name: str
    called: bool = False
    """True when the pickle also calls it (REDUCE, NEWOBJ, OBJ, INST)."""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name


@dataclass(frozen=True, slots=True)
class KeyFound:
    """A homomorphic-encryption public key (``fate_utils.<scheme>.PK``) and its modulus size."""

    scheme: str
    """``paillier`` or ``ou`` (the ``fate_utils`` submodule)."""
    bits: int
    """Bit length of the modulus n; 0 when the state could not be decoded."""
    fingerprint: str
    """First 16 hex digits of SHA-256 over the modulus's hex text; empty when undecodable."""


@dataclass(frozen=True, slots=True)
class EncryptedTensorFound:
    """An encrypted tensor (``PHETensor``) and the key(s) it carries."""

    cls: str
    key_bits: tuple[int, ...]
    """Modulus sizes of the keys found inside its state (normally exactly one)."""
    shape: tuple[int, ...] | None
    """The tensor shape when it is a plain tuple/``torch.Size`` of ints in the state, else None."""


@dataclass(frozen=True, slots=True)
class ColumnStats:
    """Statistics of one feature (the last axes of a tensor flattened; one column per feature)."""

    index: int
    count: int
    """Number of values seen (rows)."""
    nan: int
    posinf: int
    neginf: int
    min: float | None
    """Smallest finite value, None when there is none."""
    max: float | None


@dataclass(frozen=True, slots=True)
class TensorFound:
    """A safetensors blob (a FATE-serialized torch tensor or numpy array)."""

    name: str
    """The tensor's key in the safetensors header (FATE uses ``t`` for torch and ``n`` for numpy)."""
    dtype: str
    """safetensors dtype string (``F32``, ``I64``, ...)."""
    shape: tuple[int, ...]
    nbytes: int
    nan: int
    """NaN values: also the null (missing) count, as FATE and pandas encode a missing value as NaN."""
    posinf: int
    neginf: int
    min: float | None
    """Smallest finite value over the whole tensor, None when none was seen."""
    max: float | None
    columns: tuple[ColumnStats, ...]
    """Per-feature statistics (empty when the tensor has too many features to track)."""

    @property
    def empty(self) -> bool:
        """True when the tensor holds no values at all (a zero in its shape)."""
        return any(d == 0 for d in self.shape)


@dataclass(frozen=True, slots=True)
class Malformed:
    """The bytes are not what their framing claims (bad opcode, truncated pickle, bad header)."""

    where: str
    """Which inspector: ``pickle``, ``safetensors``, ``osx``, ``rollsite``, ``table``, ``fate``."""
    detail: str


@dataclass(frozen=True, slots=True)
class ScanLimit:
    """An inspector hit one of its bounds (memo size, stack depth, reassembly bytes) and stopped."""

    limit: str
    detail: str


Event = GlobalImported | KeyFound | EncryptedTensorFound | TensorFound | Malformed | ScanLimit
