"""Read and write ``fate_utils.paillier`` (FATE 2.x) serialized keys and vectors.

``fate_utils`` pickles its objects as bincode bytes (``__getstate__`` / ``__setstate__``). The layout:

    BInt              u32 LE radix (16) | u64 LE length | ASCII digits (lowercase hex, '-' if negative)
    PK                BInt n | BInt n^2 | BInt max_int (= n // 2)
    SK                BInt p | q | n | p-1 | q-1 | p^2 | q^2 | p^-1 mod q | hp | hq      (p < q)
    Coder             BInt n | BInt max_int
    CiphertextVector  u64 LE count | count x (BInt c | i32 LE exp)
    PlaintextVector   u64 LE count | count x (BInt significand | i32 LE exp)

fate_utils may write a ciphertext as a negative representative (its ``%`` keeps the sign); readers
here normalise every ciphertext into [0, n^2). Exponents are base-16 fixed-point exponents
(:mod:`fedgate.compute.encoding`).

Rules: pure byte work, no fate_utils import (tests import the real wheel and check both ways);
secret keys are read only to import a key into this gateway and written only for a local FATE
process of the same party; neither is ever logged.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from fedgate.compute.api import HeBackend
from fedgate.compute.encoding import FixedPointCoder
from fedgate.compute.limbs import LimbBuffer, from_limbs, to_limbs
from fedgate.compute.paillier import PublicKey, SecretKey
from fedgate.errors import InvalidRequestError

__all__ = [
    "FateVector",
    "add_vectors",
    "dump_ciphertexts",
    "dump_coder",
    "dump_plaintexts",
    "dump_public_key",
    "dump_secret_key",
    "load_ciphertexts",
    "load_plaintexts",
    "load_public_key",
    "load_secret_key",
    "mul_vectors",
    "pack_squeeze",
]

K_RADIX = 16  # fate_utils writes big integers in hex


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise InvalidRequestError("truncated fate_utils state")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def i32(self) -> int:
        return int(struct.unpack("<i", self.take(4))[0])

    def bint(self) -> int:
        radix = struct.unpack("<I", self.take(4))[0]
        length = self.u64()
        try:
            return int(self.take(length).decode("ascii"), radix)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequestError(f"bad big integer in fate_utils state: {exc}") from exc

    def done(self) -> None:
        if self.pos != len(self.data):
            raise InvalidRequestError(f"{len(self.data) - self.pos} trailing bytes in fate_utils state")


def _bint(value: int) -> bytes:
    digits = format(value, "x").encode("ascii")
    return struct.pack("<IQ", K_RADIX, len(digits)) + digits


# -- keys ------------------------------------------------------------------------------------------
def dump_public_key(pk: PublicKey) -> bytes:
    """fate_utils ``PK.__getstate__`` bytes."""
    return _bint(pk.n) + _bint(pk.n2) + _bint(pk.max_int)


def load_public_key(state: bytes | Sequence[int]) -> PublicKey:
    """A public key from fate_utils ``PK.__getstate__`` bytes (consistency checked)."""
    r = _Reader(bytes(state))
    n, n2, max_int = r.bint(), r.bint(), r.bint()
    r.done()
    if n2 != n * n or max_int != n // 2:
        raise InvalidRequestError("inconsistent fate_utils public key")
    return PublicKey(n)


def dump_secret_key(sk: SecretKey) -> bytes:
    """fate_utils ``SK.__getstate__`` bytes (for a FATE process of this same party only)."""
    p, q, n = sk.p, sk.q, sk.public.n
    parts = (p, q, n, p - 1, q - 1, sk.p2, sk.q2, sk.p_inv_q, sk.hp, sk.hq)
    return b"".join(_bint(v) for v in parts)


def load_secret_key(state: bytes | Sequence[int]) -> SecretKey:
    """A secret key from fate_utils ``SK.__getstate__`` bytes (imported into this gateway)."""
    r = _Reader(bytes(state))
    p, q, n = r.bint(), r.bint(), r.bint()
    for _ in range(7):
        r.bint()
    r.done()
    if p * q != n:
        raise InvalidRequestError("inconsistent fate_utils secret key")
    return SecretKey(p, q)


def dump_coder(pk: PublicKey) -> bytes:
    """fate_utils ``Coder.__getstate__`` bytes."""
    return _bint(pk.n) + _bint(pk.max_int)


# -- vectors ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FateVector:
    """A batch of residues with FATE's base-16 exponents beside them."""

    data: LimbBuffer
    """Ciphertexts (n^2 residues) or plaintext residues (mod n)."""
    exps: tuple[int, ...]
    """One exponent per element."""


def _dump_vector(values: Sequence[int], exps: Sequence[int]) -> bytes:
    if len(values) != len(exps):
        raise InvalidRequestError("one exponent per element is required")
    out = [struct.pack("<Q", len(values))]
    for value, exp in zip(values, exps):
        out.append(_bint(value) + struct.pack("<i", exp))
    return b"".join(out)


def _load_vector(state: bytes | Sequence[int]) -> tuple[list[int], list[int]]:
    r = _Reader(bytes(state))
    count = r.u64()
    if count > len(r.data):
        raise InvalidRequestError("implausible fate_utils vector length")
    values, exps = [], []
    for _ in range(count):
        values.append(r.bint())
        exps.append(r.i32())
    r.done()
    return values, exps


def dump_ciphertexts(vector: FateVector) -> bytes:
    """fate_utils ``CiphertextVector.__getstate__`` bytes."""
    return _dump_vector(from_limbs(vector.data), vector.exps)


def load_ciphertexts(state: bytes | Sequence[int], pk: PublicKey) -> FateVector:
    """Ciphertexts from fate_utils bytes, normalised into [0, n^2)."""
    values, exps = _load_vector(state)
    return FateVector(to_limbs((v % pk.n2 for v in values), pk.cipher_width), tuple(exps))


def dump_plaintexts(vector: FateVector, pk: PublicKey) -> bytes:
    """fate_utils ``PlaintextVector.__getstate__`` bytes (significands written signed, as FATE does)."""
    coder = FixedPointCoder(pk.n)
    return _dump_vector([coder.from_residue(v) for v in from_limbs(vector.data)], vector.exps)


def load_plaintexts(state: bytes | Sequence[int], pk: PublicKey) -> FateVector:
    """Encoded plaintexts from fate_utils bytes, as residues mod n."""
    values, exps = _load_vector(state)
    return FateVector(to_limbs((v % pk.n for v in values), pk.plain_width), tuple(exps))


# -- evaluation with FATE's exponent rules -----------------------------------------------------------
def _lower(backend: HeBackend, pk: PublicKey, vec: FateVector, target: Sequence[int]) -> LimbBuffer:
    factors = [FixedPointCoder.scale_factor(e, t) for e, t in zip(vec.exps, target)]
    if all(f == 1 for f in factors):
        return vec.data
    return backend.mul_scalar(pk, vec.data, to_limbs(factors, pk.plain_width))


def add_vectors(backend: HeBackend, pk: PublicKey, a: FateVector, b: FateVector) -> FateVector:
    """Element-wise encrypted addition; the larger exponent of each pair is lowered first (FATE)."""
    if len(a.exps) != len(b.exps):
        raise InvalidRequestError("vectors differ in length")
    target = tuple(min(x, y) for x, y in zip(a.exps, b.exps))
    return FateVector(backend.add(pk, _lower(backend, pk, a, target), _lower(backend, pk, b, target)), target)


def mul_vectors(backend: HeBackend, pk: PublicKey, a: FateVector, scalars: FateVector) -> FateVector:
    """Element-wise multiplication by encoded plaintexts; exponents add (FATE ``mul``)."""
    exps = tuple(x + y for x, y in zip(a.exps, scalars.exps))
    return FateVector(backend.mul_scalar(pk, a.data, scalars.data), exps)


def pack_squeeze(backend: HeBackend, pk: PublicKey, vec: FateVector, *, pack_num: int, shift_bit: int) -> FateVector:
    """FATE's ``CiphertextVector.pack_squeeze``: ``pack_num`` ciphertexts into one, first value highest.

    Each output is ``(((c0^(2^s) * c1)^(2^s) * c2) ...)`` mod n^2 with exponent 0, bit-identical to
    fate_utils; the plaintexts must already fit ``shift_bit`` bits each (non-negative, no exponent).
    """
    if pack_num <= 0 or shift_bit <= 0 or pack_num * shift_bit >= pk.bits:
        raise InvalidRequestError("pack_num * shift_bit must be positive and below the key size")
    count = vec.data.count
    groups = [(start, min(start + pack_num, count)) for start in range(0, count, pack_num)]
    acc = LimbBuffer.concat([vec.data.slice(a, a + 1) for a, _ in groups], pk.cipher_width)
    factor = to_limbs([1 << shift_bit] * len(groups), pk.plain_width)
    for step in range(1, pack_num):
        live = [i for i, (a, b) in enumerate(groups) if a + step < b]
        if not live:
            break
        cur = from_limbs(acc)
        sub = to_limbs([cur[i] for i in live], pk.cipher_width)
        shifted = backend.mul_scalar(pk, sub, factor.slice(0, len(live)))
        nxt = LimbBuffer.concat(
            [vec.data.slice(groups[i][0] + step, groups[i][0] + step + 1) for i in live], pk.cipher_width
        )
        for i, value in zip(live, from_limbs(backend.add(pk, shifted, nxt))):
            cur[i] = value
        acc = to_limbs(cur, pk.cipher_width)
    return FateVector(acc, (0,) * len(groups))
