"""The CPU backend: gmpy2 arithmetic, DJN fixed-base randomness, r^n pools, and a process pool.

Fast paths, in the order ``encrypt`` tries them for each element:

1. a precomputed r^n from the key's :class:`~fedgate.compute.djn.RandomnessPool` (``pool_size > 0``):
   the online cost is one multiplication mod n^2; every pooled value is used once;
2. DJN short-exponent randomness over a fixed-base table (``short_exponent = true``, see
   :mod:`fedgate.compute.djn` for the security assumption);
3. CRT encryption when the caller holds the secret key: r^n mod p^2 and mod q^2, joined;
4. textbook r^n mod n^2.

Batches of at least ``parallel_min_batch`` elements are cut into chunks and spread over a
``spawn``-started process pool (one process per core by default; ``workers = 1`` keeps everything
in-process). Workers receive only limb bytes and key numbers; a secret key crosses into a worker
process of this gateway, never further.

Rules of this module:

1. Randomness only from :mod:`secrets` (through :mod:`fedgate.compute.paillier` and ``djn``).
2. The one piece of module-level mutable state is ``_WORKER``: the per-process cache of DJN tables,
   set by the pool initializer inside worker processes only (a process pool needs it; the parent
   process keeps its own engine in the backend object).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import gmpy2
from gmpy2 import mpz

from fedgate.compute import ifma
from fedgate.compute.api import BackendStats, check_same_count, check_width
from fedgate.compute.config import ComputeConfig
from fedgate.compute.djn import DjnTable, RandomnessPool
from fedgate.compute.ifma import MultiBufferModexp
from fedgate.compute.limbs import LimbBuffer, from_limbs, to_limbs
from fedgate.compute.paillier import (
    PublicKey,
    SecretKey,
    decrypt_raw,
    invert_ciphertext,
    mul_scalar_raw,
    random_rn,
    random_rn_crt,
    random_unit,
)
from fedgate.errors import InvalidRequestError, LocalError

__all__ = ["CpuBackend", "create"]

log = logging.getLogger("fedgate.compute")

K_CHUNKS_PER_WORKER = 2  # chunks per worker process and batch (load balance vs. round trips)
K_TABLES_PER_PROCESS = 4  # DJN tables kept per process, least recently used dropped (55 MB each at 1024 bits)

Job = tuple[Any, ...]


class _Engine:
    """Per-process arithmetic with cached DJN tables (one per modulus, LRU-bounded) and the optional IFMA library."""

    def __init__(self) -> None:
        self._tables: collections.OrderedDict[int, DjnTable] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._mb: MultiBufferModexp | None = None
        self._mb_checked = False
        self.mb_reason = "not requested"

    def accel(self, wanted: bool) -> MultiBufferModexp | None:
        """The crypto_mb accelerator when ``wanted`` and available (loaded once per process)."""
        if not wanted:
            return None
        with self._lock:
            if not self._mb_checked:
                self._mb, self.mb_reason = ifma.load()
                self._mb_checked = True
        return self._mb

    def table(self, pk: PublicKey, window: int) -> DjnTable:
        with self._lock:
            tables = self._tables
            table = tables.get(pk.n)
            if table is None or (window and table.window != window):
                table = tables[pk.n] = DjnTable(pk, window=window)
                while len(tables) > K_TABLES_PER_PROCESS:
                    tables.popitem(last=False)  # bounded memory: a table is rebuilt on its next use
            tables.move_to_end(pk.n)
            return table

    def fresh_rn(
        self, pk: PublicKey, sk: SecretKey | None, count: int, short_exp: bool, window: int, use_ifma: bool
    ) -> list[mpz]:
        if short_exp:
            return self.table(pk, window).random_rns(count)
        mb = self.accel(use_ifma)
        if mb is None:
            if sk is not None:
                return [random_rn_crt(sk) for _ in range(count)]
            return [random_rn(pk) for _ in range(count)]
        rs = [random_unit(pk.n) for _ in range(count)]
        if sk is None:
            return [mpz(v) for v in mb.powm(rs, pk.n, pk.n2)]
        xps = mb.powm(rs, sk.n_mod_pphi, sk.p2)
        xqs = mb.powm(rs, sk.n_mod_qphi, sk.q2)
        p2, q2, inv = mpz(sk.p2), mpz(sk.q2), mpz(sk.p2_inv_q2)
        return [xp + p2 * ((xq - xp) * inv % q2) for xp, xq in zip(xps, xqs)]

    def decrypt(self, sk: SecretKey, cs: list[int], use_ifma: bool) -> list[mpz]:
        mb = self.accel(use_ifma)
        if mb is None:
            return [decrypt_raw(sk, c) for c in cs]
        p, q = mpz(sk.p), mpz(sk.q)
        xps = mb.powm([c % sk.p2 for c in cs], sk.p - 1, sk.p2)
        xqs = mb.powm([c % sk.q2 for c in cs], sk.q - 1, sk.q2)
        hp, hq, pinv = mpz(sk.hp), mpz(sk.hq), mpz(sk.p_inv_q)
        out = []
        for xp, xq in zip(xps, xqs):
            mp = (xp - 1) // p * hp % p
            mq = (xq - 1) // q * hq % q
            out.append(mp + p * ((mq - mp) * pinv % q))
        return out

    def run(self, job: Job) -> bytes:
        op = job[0]
        if op == "enc":
            _, n, pq, data, short_exp, window, use_ifma = job
            pk = PublicKey(n)
            sk = SecretKey(*pq) if pq else None
            ms = from_limbs(LimbBuffer(data, pk.plain_width))
            rns = self.fresh_rn(pk, sk, len(ms), short_exp, window, use_ifma)
            n_, n2 = mpz(n), mpz(pk.n2)
            return to_limbs(((1 + m * n_) * rn % n2 for m, rn in zip(ms, rns)), pk.cipher_width).data
        if op == "rn":
            _, n, pq, count, short_exp, window, use_ifma = job
            pk = PublicKey(n)
            sk = SecretKey(*pq) if pq else None
            return to_limbs(self.fresh_rn(pk, sk, count, short_exp, window, use_ifma), pk.cipher_width).data
        if op == "dec":
            _, pq, data, use_ifma = job
            sk = SecretKey(*pq)
            cs = from_limbs(LimbBuffer(data, sk.public.cipher_width))
            return to_limbs(self.decrypt(sk, cs, use_ifma), sk.public.plain_width).data
        if op == "mul":
            _, n, cdata, kdata, use_ifma = job
            pk = PublicKey(n)
            cs = from_limbs(LimbBuffer(cdata, pk.cipher_width))
            ks = from_limbs(LimbBuffer(kdata, pk.plain_width))
            if any(k >= n for k in ks):
                raise InvalidRequestError("scalar is not a residue mod n")
            mb = self.accel(use_ifma)
            if mb is None:
                return to_limbs((mul_scalar_raw(pk, c, k) for c, k in zip(cs, ks)), pk.cipher_width).data
            # same values as mul_scalar_raw: negative scalars (k > n/2) as (c^-1)^(n-k)
            half = pk.max_int
            bases = [int(invert_ciphertext(pk, c)) if k > half else c for c, k in zip(cs, ks)]
            exps = [n - k if k > half else k for k in ks]
            return to_limbs(mb.powm(bases, exps, pk.n2), pk.cipher_width).data
        if op == "powm":
            _, mod, bdata, bwidth, edata, ewidth = job
            bs = from_limbs(LimbBuffer(bdata, bwidth))
            es = from_limbs(LimbBuffer(edata, ewidth))
            return to_limbs((gmpy2.powmod(b, e, mod) for b, e in zip(bs, es)), bwidth).data
        raise InvalidRequestError(f"unknown job {op!r}")


_WORKER: list[_Engine] = []  # per worker process; see the module docstring


def _init_worker() -> None:
    _WORKER.append(_Engine())


def _work(job: Job) -> bytes:
    return _WORKER[0].run(job)


class CpuBackend:
    """gmpy2 backend; see the module docstring for the fast paths."""

    def __init__(self, config: ComputeConfig) -> None:
        self._config = config
        self._workers = config.workers or os.cpu_count() or 1
        self._engine = _Engine()
        if config.cpu_ifma:  # load crypto_mb now, and say once why it is not used
            if self._engine.accel(True) is None:
                log.warning("cpu backend: IFMA not used, gmpy2 does every exponentiation (%s)", self._engine.mb_reason)
            else:
                log.info("cpu backend: IFMA via %s", self._engine.mb_reason)
        self._executor: ProcessPoolExecutor | None = None
        self._pools: dict[int, RandomnessPool] = {}
        self._lock = threading.Lock()
        self._counts = {"enc": 0, "dec": 0, "eval": 0, "pool": 0}

    @property
    def name(self) -> str:
        return "cpu"

    # -- plumbing -------------------------------------------------------------------------------
    def _pool_executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self._workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                )
            return self._executor

    def _chunks(self, count: int) -> list[tuple[int, int]]:
        if self._workers <= 1 or count < self._config.parallel_min_batch:
            return [(0, count)]
        parts = min(count, self._workers * K_CHUNKS_PER_WORKER)
        step = -(-count // parts)
        return [(i, min(i + step, count)) for i in range(0, count, step)]

    def _map(self, jobs: list[Job]) -> list[bytes]:
        if len(jobs) == 1:
            return [self._engine.run(jobs[0])]
        executor = self._pool_executor()
        try:
            futures: list[Future[bytes]] = [executor.submit(_work, job) for job in jobs]
            return [f.result() for f in futures]
        except BrokenProcessPool as exc:
            with self._lock:
                self._executor = None  # start a fresh pool next time
            raise LocalError(f"HE worker process died: {exc}") from exc


    # -- the interface --------------------------------------------------------------------------
    def encrypt(
        self, pk: PublicKey, plaintexts: LimbBuffer, *, sk: SecretKey | None = None, obfuscate: bool = True
    ) -> LimbBuffer:
        check_width(plaintexts, pk.plain_width, "plaintexts")
        if sk is not None and sk.public != pk:
            raise InvalidRequestError("secret key does not match the public key")
        ms = from_limbs(plaintexts)
        n, n2 = mpz(pk.n), mpz(pk.n2)
        if any(m >= pk.n for m in ms):
            raise InvalidRequestError("plaintext is not a residue mod n")
        self._counts["enc"] += len(ms)
        if not obfuscate:
            return to_limbs((1 + m * n for m in ms), pk.cipher_width)
        pooled = self._take_pooled(pk, len(ms))
        head = [(1 + m * n) * rn % n2 for m, rn in zip(ms, pooled)]
        rest = plaintexts.slice(len(pooled), len(ms))
        pq = (sk.p, sk.q) if sk is not None else None
        cfg = self._config
        jobs: list[Job] = [
            ("enc", pk.n, pq, rest.slice(a, b).data, cfg.short_exponent, cfg.djn_window, cfg.cpu_ifma)
            for a, b in self._chunks(rest.count)
        ]
        tail = self._map(jobs) if rest.count else []
        return LimbBuffer(to_limbs(head, pk.cipher_width).data + b"".join(tail), pk.cipher_width)

    def decrypt(self, sk: SecretKey, ciphertexts: LimbBuffer) -> LimbBuffer:
        pk = sk.public
        check_width(ciphertexts, pk.cipher_width, "ciphertexts")
        self._counts["dec"] += ciphertexts.count
        jobs: list[Job] = [
            ("dec", (sk.p, sk.q), ciphertexts.slice(a, b).data, self._config.cpu_ifma)
            for a, b in self._chunks(ciphertexts.count)
        ]
        return LimbBuffer(b"".join(self._map(jobs)), pk.plain_width)

    def add(self, pk: PublicKey, a: LimbBuffer, b: LimbBuffer) -> LimbBuffer:
        check_width(a, pk.cipher_width, "ciphertexts")
        check_width(b, pk.cipher_width, "ciphertexts")
        check_same_count(a, b)
        self._counts["eval"] += a.count
        n2 = mpz(pk.n2)
        return to_limbs((mpz(x) * y % n2 for x, y in zip(from_limbs(a), from_limbs(b))), pk.cipher_width)

    def mul_scalar(self, pk: PublicKey, ciphertexts: LimbBuffer, scalars: LimbBuffer) -> LimbBuffer:
        check_width(ciphertexts, pk.cipher_width, "ciphertexts")
        check_width(scalars, pk.plain_width, "scalars")
        check_same_count(ciphertexts, scalars)
        self._counts["eval"] += scalars.count
        jobs: list[Job] = [
            ("mul", pk.n, ciphertexts.slice(a, b).data, scalars.slice(a, b).data, self._config.cpu_ifma)
            for a, b in self._chunks(scalars.count)
        ]
        return LimbBuffer(b"".join(self._map(jobs)), pk.cipher_width)

    def powm(self, base: LimbBuffer, exponent: LimbBuffer, modulus: int) -> LimbBuffer:
        if modulus < 3 or modulus % 2 == 0 or modulus.bit_length() > base.width * 32:
            raise InvalidRequestError("modulus must be odd, > 2 and fit the base width")
        check_same_count(base, exponent)
        self._counts["eval"] += base.count
        jobs: list[Job] = [
            ("powm", modulus, base.slice(a, b).data, base.width, exponent.slice(a, b).data, exponent.width)
            for a, b in self._chunks(base.count)
        ]
        return LimbBuffer(b"".join(self._map(jobs)), base.width)

    # -- randomness pool ------------------------------------------------------------------------
    def _take_pooled(self, pk: PublicKey, count: int) -> list[mpz]:
        with self._lock:  # concurrent service calls share the pool
            pool = self._pools.get(pk.n)
            if pool is None:
                return []
            out = pool.take(count)
            self._counts["pool"] += len(out)
            return out

    def refill_pool(self, pk: PublicKey, *, sk: SecretKey | None = None) -> int:
        """Top the key's r^n pool up to ``pool_size`` (blocking; call it from a worker thread)."""
        size = self._config.pool_size
        if size <= 0:
            return 0
        with self._lock:
            pool = self._pools.setdefault(pk.n, RandomnessPool(size, low_water=self._config.pool_low_water))
            deficit = pool.deficit()
        if deficit <= 0:
            return 0
        pq = (sk.p, sk.q) if sk is not None else None
        cfg = self._config
        jobs: list[Job] = [
            ("rn", pk.n, pq, b - a, cfg.short_exponent, cfg.djn_window, cfg.cpu_ifma) for a, b in self._chunks(deficit)
        ]
        values = [mpz(v) for data in self._map(jobs) for v in from_limbs(LimbBuffer(data, pk.cipher_width))]
        with self._lock:
            pool.add(values)
        return len(values)

    def pool_level(self, pk: PublicKey) -> int:
        """r^n values in stock for ``pk``."""
        with self._lock:
            pool = self._pools.get(pk.n)
            return len(pool) if pool is not None else 0

    def forget(self, pk: PublicKey) -> None:
        """Drop the key's pool (its unused r^n values are discarded, never reused)."""
        with self._lock:
            self._pools.pop(pk.n, None)

    def statistics(self) -> BackendStats:
        c = self._counts
        accel = " + crypto_mb IFMA" if self._engine.accel(self._config.cpu_ifma) is not None else ""
        device = f"gmpy2{accel} x {self._workers} process{'es' if self._workers > 1 else ''}"
        return BackendStats("cpu", device, c["enc"], c["dec"], c["eval"], c["pool"])

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def create(config: ComputeConfig) -> CpuBackend:
    """Registry factory."""
    return CpuBackend(config)
