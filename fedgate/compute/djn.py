"""Damgard-Jurik-Nielsen short-exponent randomness over a fixed-base table, and the r^n pool.

DJN (Damgard, Jurik, Nielsen, "A generalization of Paillier's public-key system with applications
to electronic voting", IJIS 2010, section 4.2 "a more efficient variant"): pick x uniform in Z_n^*,
h = -x^2 mod n (a generator, with overwhelming probability, of the Jacobi-symbol-1 subgroup of the
squares' extension) and hs = h^n mod n^2, then encrypt with r^n := hs^a for a uniform in [0, 2^ceil(k/2)),
k = bits of n.

Security assumption (say it whenever this is switched on): besides DCR (Paillier's own), the scheme
assumes that hs^a with a short (k/2-bit) uniform exponent is indistinguishable from a uniform n-th
residue (the DJN "short exponent" assumption; best known attacks are generic square-root attacks on
the exponent, 2^(k/4) work: 2^256 for 1024-bit keys). Ciphertexts stay ordinary Paillier
ciphertexts: anyone, FATE included, decrypts and evaluates them unchanged. Switch it off with
``[compute] short_exponent = false`` to get textbook r^n with r uniform in Z_n^*.

Rules of this module:

1. Every exponent ``a`` and every x is drawn from :mod:`secrets`; a table is per key and per process.
2. :class:`RandomnessPool` hands each precomputed r^n out exactly once (popped, never copied).
3. Pure: no I/O, no clock.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable

import gmpy2
from gmpy2 import mpz

from fedgate.compute.paillier import PublicKey

__all__ = ["DjnTable", "RandomnessPool", "default_window"]


def default_window(bits: int) -> int:
    """The fixed-base window (bits) for a modulus size: 10 up to 1024 bits, 9 up to 2048, else 8."""
    if bits <= 1024:
        return 10
    if bits <= 2048:
        return 9
    return 8


def _rows(base: mpz, modulus: mpz, window: int, exponent_bits: int) -> list[list[mpz]]:
    rows: list[list[mpz]] = []
    for _ in range((exponent_bits + window - 1) // window):
        row = [mpz(1), base]
        for _ in range(2, 1 << window):
            row.append(row[-1] * base % modulus)
        rows.append(row)
        base = row[-1] * base % modulus
    return rows


def _walk(rows: list[list[mpz]], a: int, mask: int, window: int, modulus: mpz) -> mpz:
    acc = rows[0][a & mask]
    for row in rows[1:]:
        a >>= window
        acc = acc * row[a & mask] % modulus
    return acc


class DjnTable:
    """Precomputed hs^(d * 2^(w*i)) for every window i and digit d: r^n = hs^a in ceil(k/2)/w products.

    (A CRT variant for the key owner, tables mod p^2 and q^2, measured no faster here: two half-size
    walks cost about what one full-size walk does in Python, so the owner uses this table too.)
    """

    __slots__ = ("_mask", "_n2", "_rows", "exponent_bits", "hs", "n", "window")

    def __init__(self, pk: PublicKey, *, window: int = 0) -> None:
        self.n = pk.n
        self._n2 = n2 = mpz(pk.n2)
        self.window = window or default_window(pk.bits)
        self.exponent_bits = (pk.bits + 1) // 2
        while True:
            x = secrets.randbelow(pk.n - 2) + 2
            if gmpy2.gcd(x, pk.n) == 1:
                break
        h = (-x * x) % pk.n
        self.hs = gmpy2.powmod(h, pk.n, n2)
        self._mask = (1 << self.window) - 1
        self._rows = _rows(self.hs, n2, self.window, self.exponent_bits)

    def power(self, a: int) -> mpz:
        """hs^a mod n^2 for ``0 <= a < 2^exponent_bits``."""
        return _walk(self._rows, a, self._mask, self.window, self._n2)

    def random_rn(self) -> mpz:
        """A fresh r^n = hs^a with a uniform short exponent a."""
        return self.power(secrets.randbits(self.exponent_bits))

    def montgomery_rows(self, width: int) -> list[list[int]]:
        """The public table (mod n^2) with every entry times R = 2^(32 width): for device kernels."""
        r = 1 << (32 * width)
        return [[int(v) * r % self._n2 for v in row] for row in self._rows]


class RandomnessPool:
    """A bounded stock of precomputed r^n for one key; each value is handed out once.

    The owner decides when to refill (``deficit``); ``take`` returns at most what is in stock, the caller
    computes the rest fresh.
    """

    __slots__ = ("_stock", "capacity", "low_water", "served")

    def __init__(self, capacity: int, *, low_water: float = 0.5) -> None:
        self.capacity = capacity
        self.low_water = low_water
        self._stock: deque[mpz] = deque()
        self.served = 0

    def __len__(self) -> int:
        return len(self._stock)

    def take(self, count: int) -> list[mpz]:
        """Pop up to ``count`` values (fewer when the stock is short)."""
        stock = self._stock
        out = [stock.popleft() for _ in range(min(count, len(stock)))]
        self.served += len(out)
        return out

    def deficit(self) -> int:
        """How many values a refill should add now (0 above the low-water mark)."""
        if len(self._stock) >= self.capacity * self.low_water and self._stock:
            return 0
        return self.capacity - len(self._stock)

    def add(self, values: list[mpz]) -> None:
        """Stock fresh values (beyond capacity they are dropped)."""
        room = self.capacity - len(self._stock)
        self._stock.extend(values[:room])

    def fill(self, make: Callable[[], mpz]) -> int:
        """Refill to capacity with ``make()``; returns how many were added."""
        added = self.deficit()
        self._stock.extend(make() for _ in range(added))
        return added
