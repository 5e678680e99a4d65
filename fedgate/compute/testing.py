"""The conformance suite every HE backend must pass (cpu, gpu, fpga, and any future one).

Use it from a test::

    @pytest.mark.parametrize("check", K_CHECKS, ids=lambda c: c.__name__)
    def test_conformance(check, backend, keypair):
        check(backend, *keypair)

or run everything at once with :func:`check_backend`. Each check builds its inputs with
:mod:`secrets`, computes the expected answer with the pure core (:mod:`fedgate.compute.paillier`),
and raises :class:`ConformanceError` naming what differed. No pytest import here: a vendor can run
the suite against a card from a plain script.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

from fedgate.compute.api import HeBackend
from fedgate.compute.limbs import LimbBuffer, from_limbs, to_limbs
from fedgate.compute.paillier import (
    PublicKey,
    SecretKey,
    add_raw,
    decrypt_raw,
    encrypt_raw,
    mul_scalar_raw,
    random_rn,
)
from fedgate.errors import InvalidRequestError

__all__ = ["K_CHECKS", "ConformanceError", "check_backend"]

Check = Callable[[HeBackend, PublicKey, SecretKey], None]
K_BATCH = 24  # elements per check batch: small enough for CI, large enough to cross chunk borders


class ConformanceError(AssertionError):
    """A backend gave a wrong answer."""


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise ConformanceError(what)


def _plaintexts(pk: PublicKey, count: int) -> list[int]:
    edge = [0, 1, 2, pk.max_int, pk.max_int + 1, pk.n - 1]
    return (edge + [secrets.randbelow(pk.n) for _ in range(count)])[:count]


def check_roundtrip(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """decrypt(encrypt(m)) == m, edge values included; the reference core decrypts the ciphertexts."""
    ms = _plaintexts(pk, K_BATCH)
    cts = backend.encrypt(pk, to_limbs(ms, pk.plain_width))
    _expect(cts.width == pk.cipher_width and cts.count == len(ms), "ciphertext buffer has the wrong shape")
    cs = from_limbs(cts)
    _expect(all(0 < c < pk.n2 for c in cs), "ciphertext is not a residue mod n^2")
    _expect([int(decrypt_raw(sk, c)) for c in cs] == ms, "reference core cannot decrypt the backend's output")
    back = from_limbs(backend.decrypt(sk, cts))
    _expect(back == ms, "decrypt(encrypt(m)) != m")


def check_owner_encrypt(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """Encryption with the secret key at hand (CRT paths) is still correct and fresh."""
    ms = _plaintexts(pk, K_BATCH)
    cts = backend.encrypt(pk, to_limbs(ms, pk.plain_width), sk=sk)
    _expect([int(decrypt_raw(sk, c)) for c in from_limbs(cts)] == ms, "owner encryption decrypts wrongly")


def check_fresh_randomness(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """The same plaintext encrypted many times gives pairwise different ciphertexts (no reused r)."""
    cts = from_limbs(backend.encrypt(pk, to_limbs([7] * K_BATCH, pk.plain_width)))
    again = from_limbs(backend.encrypt(pk, to_limbs([7] * K_BATCH, pk.plain_width)))
    _expect(len(set(cts + again)) == 2 * K_BATCH, "two encryptions share a ciphertext: randomness reused")
    # r^n = c / (1 + 7n): distinct ciphertexts of one plaintext mean distinct r^n
    _expect(all(int(decrypt_raw(sk, c)) == 7 for c in cts), "fresh encryptions decrypt wrongly")


def check_unobfuscated(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """``obfuscate=False`` gives exactly 1 + m*n (what fate_utils does for plaintext operands)."""
    ms = _plaintexts(pk, 8)
    cs = from_limbs(backend.encrypt(pk, to_limbs(ms, pk.plain_width), obfuscate=False))
    _expect(cs == [int(encrypt_raw(pk, m, None)) for m in ms], "unobfuscated encryption differs")


def check_decrypt_foreign(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """Ciphertexts made by the reference core (textbook r^n) decrypt right."""
    ms = _plaintexts(pk, K_BATCH)
    cs = [int(encrypt_raw(pk, m, random_rn(pk))) for m in ms]
    _expect(from_limbs(backend.decrypt(sk, to_limbs(cs, pk.cipher_width))) == ms, "decryption differs")


def check_add(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """add is element-wise and matches the reference (plaintexts add mod n)."""
    ms1, ms2 = _plaintexts(pk, K_BATCH), _plaintexts(pk, K_BATCH)[::-1]
    c1 = backend.encrypt(pk, to_limbs(ms1, pk.plain_width))
    c2 = backend.encrypt(pk, to_limbs(ms2, pk.plain_width))
    out = backend.add(pk, c1, c2)
    ref = [int(add_raw(pk, a, b)) for a, b in zip(from_limbs(c1), from_limbs(c2))]
    _expect(from_limbs(out) == ref, "add differs from c1*c2 mod n^2")
    _expect(from_limbs(backend.decrypt(sk, out)) == [(a + b) % pk.n for a, b in zip(ms1, ms2)], "sum wrong")


def check_mul_scalar(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """mul_scalar with small, 64-bit, large and negative (n - k) scalars."""
    ms = _plaintexts(pk, K_BATCH)
    ks = [0, 1, 2, pk.n - 1, pk.n - 2**63, 2**64 - 1, pk.max_int, pk.max_int + 1]
    ks = (ks + [secrets.randbits(64) for _ in range(K_BATCH)])[:K_BATCH]
    c = backend.encrypt(pk, to_limbs(ms, pk.plain_width))
    out = backend.mul_scalar(pk, c, to_limbs(ks, pk.plain_width))
    got = from_limbs(out)
    _expect(all(0 <= v < pk.n2 for v in got), "mul_scalar result is not a residue mod n^2")
    # exact for k <= n/2; above (negative scalars) any valid encryption of k*m is allowed:
    # the reference inverts c, a device may use the full exponent instead
    for x, k, v in zip(from_limbs(c), ks, got):
        _expect(k > pk.max_int or v == int(mul_scalar_raw(pk, x, k)), "mul_scalar differs from the reference")
    _expect(from_limbs(backend.decrypt(sk, out)) == [m * k % pk.n for m, k in zip(ms, ks)], "product wrong")


def check_powm(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """powm matches pow() for the n^2 and p^2 moduli and mixed exponent widths."""
    for modulus in (pk.n2, sk.p2):
        width = pk.cipher_width
        bases = [0, 1, modulus - 1] + [secrets.randbelow(modulus) for _ in range(K_BATCH - 3)]
        exps = [0, 1, 2] + [secrets.randbits(pk.bits) for _ in range(K_BATCH - 3)]
        out = backend.powm(to_limbs(bases, width), to_limbs(exps, pk.plain_width), modulus)
        _expect(from_limbs(out) == [pow(b, e, modulus) for b, e in zip(bases, exps)], "powm differs")


def check_empty_batches(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """Empty batches give empty results of the right width."""
    empty_p = LimbBuffer(b"", pk.plain_width)
    empty_c = LimbBuffer(b"", pk.cipher_width)
    _expect(backend.encrypt(pk, empty_p).count == 0, "encrypt([]) is not empty")
    _expect(backend.decrypt(sk, empty_c).width == pk.plain_width, "decrypt([]) has the wrong width")
    _expect(backend.add(pk, empty_c, empty_c).count == 0, "add([]) is not empty")


def check_rejects_bad_input(backend: HeBackend, pk: PublicKey, sk: SecretKey) -> None:
    """Wrong widths, mismatched batch sizes and out-of-range plaintexts raise InvalidRequestError."""
    cases: list[Callable[[], object]] = [
        lambda: backend.encrypt(pk, to_limbs([1], pk.cipher_width)),
        lambda: backend.encrypt(pk, to_limbs([pk.n], pk.plain_width)),
        lambda: backend.decrypt(sk, to_limbs([1], pk.plain_width)),
        lambda: backend.add(pk, to_limbs([1, 1], pk.cipher_width), to_limbs([1], pk.cipher_width)),
        lambda: backend.mul_scalar(pk, to_limbs([1], pk.cipher_width), to_limbs([1, 2], pk.plain_width)),
        lambda: backend.mul_scalar(pk, to_limbs([1], pk.cipher_width), to_limbs([pk.n], pk.plain_width)),
    ]
    for index, case in enumerate(cases):
        try:
            case()
        except InvalidRequestError:
            continue
        raise ConformanceError(f"bad input #{index} was accepted")


K_CHECKS: tuple[Check, ...] = (
    check_roundtrip,
    check_owner_encrypt,
    check_fresh_randomness,
    check_unobfuscated,
    check_decrypt_foreign,
    check_add,
    check_mul_scalar,
    check_powm,
    check_empty_batches,
    check_rejects_bad_input,
)


def check_backend(backend: HeBackend, keys: Sequence[tuple[PublicKey, SecretKey]]) -> None:
    """Run every check against every key pair."""
    for pk, sk in keys:
        for check in K_CHECKS:
            check(backend, pk, sk)
