"""Fixed-width little-endian limb buffers: the one data layout every HE backend speaks.

Rules of this module:

1. A batch of big integers is a :class:`LimbBuffer`: ``count`` elements of ``width`` 32-bit limbs,
   little-endian (limb 0 least significant, each limb little-endian bytes), packed back to back. The
   GPU and FPGA backends hand these bytes to their devices unchanged.
2. Conversions to and from Python ints live here and nowhere else.
3. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedgate.errors import InvalidRequestError

__all__ = ["K_LIMB_BITS", "K_LIMB_BYTES", "LimbBuffer", "from_limbs", "limbs_for_bits", "to_limbs"]

K_LIMB_BITS = 32  # bits per limb
K_LIMB_BYTES = 4  # bytes per limb


def limbs_for_bits(bits: int) -> int:
    """How many 32-bit limbs hold a ``bits``-bit number."""
    return max(1, (bits + K_LIMB_BITS - 1) // K_LIMB_BITS)


@dataclass(frozen=True, slots=True)
class LimbBuffer:
    """``count`` unsigned integers of ``width`` little-endian 32-bit limbs each, back to back."""

    data: bytes
    """The packed limbs (``count * width * 4`` bytes)."""
    width: int
    """Limbs per element."""

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise InvalidRequestError(f"limb width must be positive, got {self.width}")
        if len(self.data) % (self.width * K_LIMB_BYTES):
            raise InvalidRequestError(
                f"buffer of {len(self.data)} bytes is not a whole number of {self.width}-limb elements"
            )

    @property
    def count(self) -> int:
        """Number of elements."""
        return len(self.data) // (self.width * K_LIMB_BYTES)

    @property
    def element_bytes(self) -> int:
        """Bytes per element."""
        return self.width * K_LIMB_BYTES

    def element(self, index: int) -> int:
        """Element ``index`` as an int."""
        size = self.element_bytes
        return int.from_bytes(self.data[index * size : (index + 1) * size], "little")

    def slice(self, start: int, stop: int) -> LimbBuffer:
        """Elements ``start`` (inclusive) to ``stop`` (exclusive)."""
        size = self.element_bytes
        return LimbBuffer(self.data[start * size : stop * size], self.width)

    @staticmethod
    def concat(parts: Sequence[LimbBuffer], width: int) -> LimbBuffer:
        """Join buffers of the same width."""
        for part in parts:
            if part.width != width:
                raise InvalidRequestError(f"cannot join a {part.width}-limb buffer into {width} limbs")
        return LimbBuffer(b"".join(part.data for part in parts), width)


def to_limbs(values: Iterable[int], width: int) -> LimbBuffer:
    """Pack non-negative ints below ``2**(32*width)`` into a buffer."""
    size = width * K_LIMB_BYTES
    try:
        data = b"".join(int(v).to_bytes(size, "little") for v in values)
    except OverflowError as exc:
        raise InvalidRequestError(f"value does not fit {width} limbs or is negative") from exc
    return LimbBuffer(data, width)


def from_limbs(buf: LimbBuffer) -> list[int]:
    """Unpack a buffer into Python ints."""
    size = buf.element_bytes
    data = buf.data
    return [int.from_bytes(data[i : i + size], "little") for i in range(0, len(data), size)]
