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

Speed (CPU): a table row per window of the exponent holds hs^(d * 2^(w*i)) for every digit d, so r^n
costs ceil(k/2 / w) - 1 products mod n^2 and no squaring. :meth:`DjnTable.random_rns` walks a batch
"step-major": one row for every element of a chunk before the next row, so the row being read stays in
the core's cache (the per-element walk misses it: about 15 % slower at w = 12); the digits of all
exponents of a chunk come from one ``secrets.token_bytes`` call, cut into w-bit digits with numpy (the
top digit masked, so a is exactly ceil(k/2) bits, uniform). Measured per 1024-bit encryption on one
Zen 4 core: 101 us per element-major walk at w = 10, 77 us step-major at w = 12.

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

K_WALK_CHUNK = 4096  # elements walked together, one row at a time (fewer, larger numpy draws; 1-2 MB of accumulators)
K_MAX_BATCH_WINDOW = 16  # digits are cut from 16-bit words


def default_window(bits: int) -> int:
    """The fixed-base window (bits) for a modulus size: 12 up to 1024 bits, 9 up to 2048, else 8.

    Memory per table: ceil(bits/2 / w) rows of 2^w values of 2*bits/8 bytes (plus about 40 bytes per
    value): about 55 MB at 1024 bits (w = 12), 33 MB at 2048 bits (w = 9), measured as RSS growth.
    """
    if bits <= 1024:
        return 12
    if bits <= 2048:
        return 9
    return 8


def _digit_rows(exps: list[int] | None, count: int, window: int, exponent_bits: int) -> list[list[int]]:
    """Digit i of every exponent, row by row (``rows[i][j]`` = digit i of element j).

    With ``exps`` None the exponents are fresh: ``count`` uniform ``exponent_bits``-bit numbers from
    ``secrets.token_bytes`` (uniform 16-bit words masked to w bits, the top digit to what is left).
    """
    import numpy as np  # a runtime dependency; imported here so that importing djn stays light

    nwin = -(-exponent_bits // window)
    mask = (1 << window) - 1
    if exps is None:
        words = np.frombuffer(secrets.token_bytes(2 * nwin * count), dtype="<u2").reshape(nwin, count)
        digits = words & np.uint16(mask)
        digits[-1] &= np.uint16((1 << (exponent_bits - window * (nwin - 1))) - 1)
        out: list[list[int]] = digits.tolist()
        return out
    return [[(a >> (window * i)) & mask for a in exps] for i in range(nwin)]


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

    def powers(self, exps: list[int]) -> list[mpz]:
        """``[hs^a mod n^2 for a in exps]`` (each ``0 <= a < 2^exponent_bits``), walked step-major."""
        if any(a < 0 or a >> self.exponent_bits for a in exps):
            raise ValueError("DJN exponent out of range")
        out: list[mpz] = []
        for start in range(0, len(exps), K_WALK_CHUNK):
            part = exps[start : start + K_WALK_CHUNK]
            out += self._walk_rows(_digit_rows(part, len(part), self.window, self.exponent_bits))
        return out

    def random_rns(self, count: int) -> list[mpz]:
        """``count`` fresh r^n = hs^a, every a uniform in [0, 2^exponent_bits) from :mod:`secrets`."""
        if self.window > K_MAX_BATCH_WINDOW:
            return [self.random_rn() for _ in range(count)]
        out: list[mpz] = []
        for start in range(0, count, K_WALK_CHUNK):
            part = min(K_WALK_CHUNK, count - start)
            out += self._walk_rows(_digit_rows(None, part, self.window, self.exponent_bits))
        return out

    def _walk_rows(self, digit_rows: list[list[int]]) -> list[mpz]:
        rows, n2 = self._rows, self._n2
        first = rows[0]
        accs = [first[d] for d in digit_rows[0]]
        for row, digits in zip(rows[1:], digit_rows[1:]):
            accs = [acc * row[d] % n2 for acc, d in zip(accs, digits)]
        return accs

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
