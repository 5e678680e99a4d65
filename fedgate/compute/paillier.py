"""The pure Paillier core: keys, key generation and the per-element arithmetic (gmpy2).

Scheme (Paillier 1999 with g = n + 1, as FATE uses it):

    encrypt  c = (1 + m*n) * r^n  mod n^2        r uniform in Z_n^*, fresh for every ciphertext
    decrypt  m_p = L_p(c^(p-1) mod p^2) * h_p mod p, same for q, joined by CRT (L_p(x) = (x-1)/p)
    add      c1 * c2 mod n^2                     (plaintexts add mod n)
    mul      c^k mod n^2; for k > n/2 (a negative scalar) (c^-1)^(n-k), a short exponent

Rules of this module:

1. Randomness comes from :mod:`secrets` only (the OS CSPRNG); nothing here is seeded.
2. A :class:`SecretKey` never prints its factors: ``repr`` shows the key id only, so a key that ends up
   in a log line or a traceback leaks nothing.
3. Pure: no I/O, no clock; gmpy2 for the arithmetic.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

import gmpy2
from gmpy2 import mpz

from fedgate.compute.limbs import limbs_for_bits
from fedgate.errors import InvalidRequestError

__all__ = [
    "K_MIN_KEY_BITS",
    "PublicKey",
    "SecretKey",
    "add_raw",
    "decrypt_raw",
    "encrypt_raw",
    "generate_keypair",
    "invert_ciphertext",
    "mul_scalar_raw",
    "random_rn",
    "random_rn_crt",
    "random_unit",
]

K_MIN_KEY_BITS = 1024  # bits; anything shorter is refused
K_MR_ROUNDS = 64  # Miller-Rabin rounds per prime candidate (error < 4^-64)
K_MIN_PQ_GAP_BITS = 100  # bits; |p - q| must exceed 2^(bits/2 - 100) (Fermat factoring)


@dataclass(frozen=True, slots=True, eq=False)
class PublicKey:
    """A Paillier public key (g = n + 1)."""

    n: int
    """The modulus."""
    n2: int = field(init=False)
    """n squared."""
    bits: int = field(init=False)
    """Bit length of n."""
    max_int: int = field(init=False)
    """Largest positive plaintext magnitude of the signed encoding (FATE: n // 2)."""
    key_id: str = field(init=False)
    """Stable id: the first 16 hex digits of SHA-256 over n's bytes."""

    def __post_init__(self) -> None:
        n = int(self.n)
        if n < 3 or n % 2 == 0:
            raise InvalidRequestError("a Paillier modulus must be odd and > 2")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "n2", n * n)
        object.__setattr__(self, "bits", n.bit_length())
        object.__setattr__(self, "max_int", n // 2)
        digest = hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()
        object.__setattr__(self, "key_id", digest[:16])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.n == self.n

    def __hash__(self) -> int:
        return hash(self.n)

    @property
    def plain_width(self) -> int:
        """Limbs per plaintext (residue mod n)."""
        return limbs_for_bits(self.bits)

    @property
    def cipher_width(self) -> int:
        """Limbs per ciphertext (residue mod n^2): always twice ``plain_width``."""
        return 2 * self.plain_width


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class SecretKey:
    """A Paillier secret key: the factors of n and the CRT constants."""

    p: int
    """The smaller prime factor."""
    q: int
    """The larger prime factor."""
    public: PublicKey = field(init=False)
    """The matching public key."""
    p2: int = field(init=False)
    """p squared."""
    q2: int = field(init=False)
    """q squared."""
    hp: int = field(init=False)
    """L_p(g^(p-1) mod p^2)^-1 mod p."""
    hq: int = field(init=False)
    """L_q(g^(q-1) mod q^2)^-1 mod q."""
    p_inv_q: int = field(init=False)
    """p^-1 mod q."""
    n_mod_pphi: int = field(init=False)
    """n mod p(p-1): exponent of r^n mod p^2 (CRT encryption)."""
    n_mod_qphi: int = field(init=False)
    """n mod q(q-1)."""
    p2_inv_q2: int = field(init=False)
    """(p^2)^-1 mod q^2 (CRT encryption)."""

    def __post_init__(self) -> None:
        p, q = sorted((int(self.p), int(self.q)))
        if p == q:
            raise InvalidRequestError("p and q must differ")
        n = p * q
        g = n + 1
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "public", PublicKey(n))
        object.__setattr__(self, "p2", p * p)
        object.__setattr__(self, "q2", q * q)
        object.__setattr__(self, "hp", int(gmpy2.invert((pow(g, p - 1, p * p) - 1) // p, p)))
        object.__setattr__(self, "hq", int(gmpy2.invert((pow(g, q - 1, q * q) - 1) // q, q)))
        object.__setattr__(self, "p_inv_q", int(gmpy2.invert(p, q)))
        object.__setattr__(self, "n_mod_pphi", n % (p * (p - 1)))
        object.__setattr__(self, "n_mod_qphi", n % (q * (q - 1)))
        object.__setattr__(self, "p2_inv_q2", int(gmpy2.invert(p * p, q * q)))

    def __repr__(self) -> str:
        return f"SecretKey(key_id={self.public.key_id!r}, bits={self.public.bits}, factors=<redacted>)"

    __str__ = __repr__


def _random_prime(bits: int) -> int:
    """A uniformly drawn prime of exactly ``bits`` bits with the top two bits set."""
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if gmpy2.is_prime(candidate, K_MR_ROUNDS):
            return candidate


def generate_keypair(bits: int) -> tuple[PublicKey, SecretKey]:
    """Generate a key pair with safe parameters.

    p and q are independent random primes of ``bits/2`` bits each with the top two bits set (so n has
    exactly ``bits`` bits), ``|p - q| > 2^(bits/2 - 100)`` (no Fermat factoring) and
    ``gcd(n, (p-1)(q-1)) = 1`` (g = n + 1 has order n). All draws come from :mod:`secrets`.
    """
    if bits < K_MIN_KEY_BITS or bits % 2:
        raise InvalidRequestError(f"key size must be even and >= {K_MIN_KEY_BITS} bits, got {bits}")
    half = bits // 2
    while True:
        p = _random_prime(half)
        q = _random_prime(half)
        if abs(p - q) >> (half - K_MIN_PQ_GAP_BITS) == 0:
            continue
        n = p * q
        if n.bit_length() != bits or gmpy2.gcd(n, (p - 1) * (q - 1)) != 1:
            continue
        sk = SecretKey(p, q)
        return sk.public, sk


def random_unit(n: int) -> int:
    """r uniform in Z_n^* (from :mod:`secrets`)."""
    while True:
        r = secrets.randbelow(n - 1) + 1
        if gmpy2.gcd(r, n) == 1:
            return r


def random_rn(pk: PublicKey) -> mpz:
    """A fresh r^n mod n^2 with r uniform in Z_n^* (textbook, public-key only)."""
    return gmpy2.powmod(random_unit(pk.n), pk.n, pk.n2)


def random_rn_crt(sk: SecretKey) -> mpz:
    """A fresh r^n mod n^2 for the key owner: two half-size exponentiations joined by CRT."""
    r = random_unit(sk.public.n)
    xp = gmpy2.powmod(r, sk.n_mod_pphi, sk.p2)
    xq = gmpy2.powmod(r, sk.n_mod_qphi, sk.q2)
    return xp + sk.p2 * ((xq - xp) * sk.p2_inv_q2 % sk.q2)


def encrypt_raw(pk: PublicKey, m: int, rn: int | None) -> mpz:
    """(1 + m*n) * rn mod n^2 for a residue ``0 <= m < n``; ``rn=None`` gives the unobfuscated 1 + m*n."""
    if not 0 <= m < pk.n:
        raise InvalidRequestError("plaintext is not a residue mod n")
    gm = mpz(1) + mpz(m) * pk.n
    return gm if rn is None else gm * rn % pk.n2


def decrypt_raw(sk: SecretKey, c: int) -> mpz:
    """CRT decryption of ``c`` to the residue ``m mod n``."""
    c = mpz(c)
    p, q = sk.p, sk.q
    mp = (gmpy2.powmod(c, p - 1, sk.p2) - 1) // p * sk.hp % p
    mq = (gmpy2.powmod(c, q - 1, sk.q2) - 1) // q * sk.hq % q
    return mp + p * ((mq - mp) * sk.p_inv_q % q)


def add_raw(pk: PublicKey, a: int, b: int) -> mpz:
    """Homomorphic addition."""
    return mpz(a) * b % pk.n2


def mul_scalar_raw(pk: PublicKey, c: int, k: int) -> mpz:
    """Homomorphic multiplication by a residue ``k``; scalars above n/2 (negatives) use (c^-1)^(n-k)."""
    if k > pk.max_int:
        return gmpy2.powmod(invert_ciphertext(pk, c), pk.n - k, pk.n2)
    return gmpy2.powmod(c, k, pk.n2)


def invert_ciphertext(pk: PublicKey, c: int) -> mpz:
    """c^-1 mod n^2 (an encryption of -m); a non-unit is not a ciphertext."""
    try:
        return gmpy2.invert(c, pk.n2)
    except ZeroDivisionError as exc:
        raise InvalidRequestError("ciphertext is not invertible mod n^2") from exc
