"""Fixed-point encoding of floats and signed ints the way FATE 2.x's ``fate_utils`` Coder does it.

An encoded number is ``(significand, exponent)`` standing for ``significand * 16^exponent`` (base 16):

* floats: exponent = floor((frexp(x).exponent - 53) / 4), significand = round(x * 16^-exponent), so
  every bit of the double survives; ``|significand| <= max_int = n // 2`` or the encoding fails;
* ints: exponent 0, significand = x;
* a negative significand is stored as the residue n + s; residues above n - max_int decode negative.

Ciphertexts carry the exponent beside them (``fate_utils``' ``Ciphertext.exp``); adding two with
different exponents first multiplies the larger-exponent one by 16^(difference).

Packing (``pack_floats``): several non-negative fixed-point values of ``offset_bit`` bits each share
one plaintext, first value in the most significant slot, as ``fate_utils.Coder.pack_floats`` and
``CiphertextVector.pack_squeeze`` do.

Rules: pure; exact integer arithmetic (``fractions.Fraction`` for decoding), no floats in between.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from fedgate.errors import InvalidRequestError

__all__ = ["K_BASE", "K_LOG2_BASE", "Encoded", "FixedPointCoder"]

K_BASE = 16  # FATE's fixed-point base
K_LOG2_BASE = 4  # bits per base digit
K_MANTISSA_BITS = 53  # bits in a double's significand


@dataclass(frozen=True, slots=True)
class Encoded:
    """One encoded plaintext: ``residue`` mod n (signed significand) and its base-16 exponent."""

    residue: int
    """The significand as a residue mod n (negatives stored as n + s)."""
    exp: int
    """Base-16 exponent."""


class FixedPointCoder:
    """FATE 2.x Coder for one modulus n (``max_int = n // 2``)."""

    __slots__ = ("max_int", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self.max_int = n // 2

    # -- signed significands <-> residues -------------------------------------------------------
    def to_residue(self, significand: int) -> int:
        """A signed significand as a residue mod n."""
        if abs(significand) > self.max_int:
            raise InvalidRequestError(f"integer needs to be within +/- max_int, got {significand}")
        return significand % self.n

    def from_residue(self, residue: int) -> int:
        """A residue back to its signed significand (FATE's overflow rules)."""
        if residue < 0 or residue >= self.n:
            raise InvalidRequestError("attempted to decode a corrupted number")
        if residue <= self.max_int:
            return residue
        if residue >= self.n - self.max_int:
            return residue - self.n
        raise InvalidRequestError("overflow detected in decrypted number")

    # -- floats ----------------------------------------------------------------------------------
    def encode_f64(self, value: float) -> Encoded:
        """Encode a finite double exactly."""
        if not math.isfinite(value):
            raise InvalidRequestError(f"cannot encode {value!r}")
        bin_exp = math.frexp(value)[1]
        exp = math.floor((bin_exp - K_MANTISSA_BITS) / K_LOG2_BASE)
        scaled = Fraction(value) * Fraction(K_BASE) ** (-exp)
        significand = round(scaled)
        return Encoded(self.to_residue(significand), exp)

    def decode_f64(self, enc: Encoded) -> float:
        """Decode to the nearest double."""
        significand = self.from_residue(enc.residue)
        return float(Fraction(significand) * Fraction(K_BASE) ** enc.exp)

    def encode_f64_vec(self, values: Sequence[float]) -> list[Encoded]:
        """Encode each value."""
        return [self.encode_f64(float(v)) for v in values]

    def decode_f64_vec(self, encs: Sequence[Encoded]) -> list[float]:
        """Decode each value."""
        return [self.decode_f64(e) for e in encs]

    # -- ints ------------------------------------------------------------------------------------
    def encode_i64(self, value: int) -> Encoded:
        """Encode a signed int (exponent 0)."""
        return Encoded(self.to_residue(int(value)), 0)

    def decode_i64(self, enc: Encoded) -> int:
        """Decode to an int (truncating a fractional part, as FATE's shift does)."""
        significand = self.from_residue(enc.residue)
        if enc.exp >= 0:
            return significand << (K_LOG2_BASE * enc.exp)
        return significand >> (-K_LOG2_BASE * enc.exp)

    # -- alignment ------------------------------------------------------------------------------
    @staticmethod
    def scale_factor(from_exp: int, to_exp: int) -> int:
        """The plaintext factor 16^(from_exp - to_exp) that lowers an exponent (``to_exp <= from_exp``)."""
        if to_exp > from_exp:
            raise InvalidRequestError("an exponent can only be lowered")
        return 1 << (K_LOG2_BASE * (from_exp - to_exp))

    # -- packing --------------------------------------------------------------------------------
    def pack_floats(self, values: Sequence[float], *, offset_bit: int, pack_num: int, precision: int) -> list[int]:
        """Pack ``pack_num`` values per plaintext: round(x * 2^precision) in ``offset_bit``-bit slots."""
        if pack_num <= 0 or offset_bit <= 0:
            raise InvalidRequestError("pack_num and offset_bit must be positive")
        if pack_num * offset_bit >= self.n.bit_length() - 1:
            raise InvalidRequestError("packed values would overflow the plaintext space")
        scale = 1 << precision
        out = []
        for start in range(0, len(values), pack_num):
            acc = 0
            for v in values[start : start + pack_num]:
                slot = round(Fraction(float(v)) * scale)
                if slot < 0 or slot >> offset_bit:
                    raise InvalidRequestError(f"value {v!r} does not fit an unsigned {offset_bit}-bit slot")
                acc = (acc << offset_bit) + slot
            out.append(acc)
        return out

    @staticmethod
    def unpack_floats(
        packed: Sequence[int], *, offset_bit: int, pack_num: int, precision: int, total: int
    ) -> list[float]:
        """Inverse of :meth:`pack_floats` (the last plaintext may hold fewer than ``pack_num``)."""
        mask = (1 << offset_bit) - 1
        scale = Fraction(1, 1 << precision)
        out: list[float] = []
        remaining = total
        for value in packed:
            k = min(remaining, pack_num)
            slots = []
            for _ in range(k):
                slots.append(float((value & mask) * scale))
                value >>= offset_bit
            out.extend(reversed(slots))
            remaining -= k
        return out
