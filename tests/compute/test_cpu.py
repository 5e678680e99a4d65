"""The CPU backend against the conformance suite, in-process and over a process pool."""

from __future__ import annotations

import logging
import pathlib
import platform
import secrets
import sys
from collections.abc import Iterator

import pytest

from fedgate.compute.config import ComputeConfig
from fedgate.compute.cpu import CpuBackend
from fedgate.compute.limbs import from_limbs, to_limbs
from fedgate.compute.paillier import decrypt_raw
from fedgate.compute.testing import K_CHECKS, Check, check_backend
from fedgate.errors import InvalidRequestError

from .conftest import KeyPair

CONFIGS = {
    "djn-inproc": ComputeConfig(workers=1, short_exponent=True),
    "textbook-gmpy2": ComputeConfig(workers=1, short_exponent=False, cpu_ifma=False),
    "textbook-ifma-if-present": ComputeConfig(workers=1, short_exponent=False, cpu_ifma=True),
    "djn-2proc-pool": ComputeConfig(workers=2, parallel_min_batch=8, pool_size=16, djn_window=6, cpu_ifma=False),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def backend(request: pytest.FixtureRequest) -> Iterator[CpuBackend]:
    b = CpuBackend(CONFIGS[request.param])
    yield b
    b.close()


@pytest.mark.parametrize("check", K_CHECKS, ids=lambda c: c.__name__)
def test_conformance(check: Check, backend: CpuBackend, keys1024: KeyPair) -> None:
    pk, sk = keys1024
    backend.refill_pool(pk)
    check(backend, pk, sk)


def test_conformance_2048(keys2048: KeyPair) -> None:
    b = CpuBackend(ComputeConfig(workers=1, djn_window=6))
    try:
        check_backend(b, [keys2048])
    finally:
        b.close()


def test_pool_values_are_used_once_then_fresh(keys1024: KeyPair) -> None:
    pk, sk = keys1024
    b = CpuBackend(ComputeConfig(workers=1, pool_size=8, pool_low_water=0.5))
    assert b.refill_pool(pk) == 8 and b.pool_level(pk) == 8
    cts = from_limbs(b.encrypt(pk, to_limbs([0] * 12, pk.plain_width)))
    # encrypting 0 exposes r^n itself: all twelve must differ (8 pooled + 4 fresh)
    assert len(set(cts)) == 12 and all(decrypt_raw(sk, c) == 0 for c in cts)
    assert b.pool_level(pk) == 0 and b.statistics().pool_served == 8
    assert b.refill_pool(pk) == 8
    again = from_limbs(b.encrypt(pk, to_limbs([0] * 8, pk.plain_width)))
    assert not set(again) & set(cts)
    b.forget(pk)
    assert b.pool_level(pk) == 0


def test_check_backend_runs_everything(keys1024: KeyPair) -> None:
    b = CpuBackend(ComputeConfig(workers=1))
    check_backend(b, [keys1024])
    stats = b.statistics()
    assert stats.name == "cpu" and stats.encrypted > 0 and stats.decrypted > 0 and stats.evaluated > 0


def _ifma_expected() -> bool:
    """ipp-crypto is a runtime dependency on x86_64 Linux: where the CPU has IFMA it must load."""
    from fedgate.compute import ifma

    return sys.platform.startswith("linux") and platform.machine() == "x86_64" and ifma._cpu_has_ifma()


def test_crypto_mb_matches_gmpy2_when_present(keys1024: KeyPair) -> None:
    from fedgate.compute import ifma

    mb, reason = ifma.load()
    if mb is None:
        assert not _ifma_expected(), f"the CPU has avx512ifma but crypto_mb does not load: {reason}"
        pytest.skip(f"crypto_mb not usable here: {reason}")
    pk, sk = keys1024
    bases = [0, 1, sk.p2 - 1] + [secrets.randbits(2048) for _ in range(10)]  # unreduced bases too
    assert mb.powm(bases, sk.p - 1, sk.p2) == [pow(b, sk.p - 1, sk.p2) for b in bases]
    exps = [secrets.randbits(1024) for _ in bases]
    assert mb.powm(bases, exps, pk.n2) == [pow(b, e, pk.n2) for b, e in zip(bases, exps)]
    assert mb.powm([], 5, pk.n2) == []
    with pytest.raises(InvalidRequestError):
        mb.powm([2], 3, 1 << 5000 | 1)
    b = CpuBackend(ComputeConfig(workers=1, cpu_ifma=True))
    assert "crypto_mb" in b.statistics().device


def test_crypto_mb_loader_explains_absence(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    from fedgate.compute import ifma

    monkeypatch.setattr(ifma, "_cpu_has_ifma", lambda: False)
    assert ifma.load() == (None, "the CPU does not report avx512ifma")
    monkeypatch.setattr(ifma, "_cpu_has_ifma", lambda: True)
    monkeypatch.setattr(ifma, "_search_dirs", lambda: [tmp_path])
    mb, reason = ifma.load()
    assert mb is None and "libcrypto_mb.so not found" in reason


def test_ifma_is_the_default_where_the_cpu_has_it() -> None:
    b = CpuBackend(ComputeConfig(workers=1))
    assert ("crypto_mb" in b.statistics().device) == _ifma_expected()


def test_fallback_to_gmpy2_is_logged_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, keys1024: KeyPair
) -> None:
    from fedgate.compute import ifma

    monkeypatch.setattr(ifma, "_cpu_has_ifma", lambda: False)
    with caplog.at_level(logging.WARNING, logger="fedgate.compute"):
        b = CpuBackend(ComputeConfig(workers=1))
    assert "IFMA not used" in caplog.text and "does not report avx512ifma" in caplog.text
    assert "crypto_mb" not in b.statistics().device
    pk, sk = keys1024
    assert from_limbs(b.decrypt(sk, b.encrypt(pk, to_limbs([5, 7], pk.plain_width)))) == [5, 7]


def test_djn_tables_per_process_are_bounded() -> None:
    import gmpy2

    from fedgate.compute import cpu
    from fedgate.compute.paillier import PublicKey

    def small_key(i: int) -> PublicKey:  # tables only need n; small moduli keep the test fast
        return PublicKey(int(gmpy2.next_prime(2**127 + 1000 * i) * gmpy2.next_prime(2**128 + 7000 * i)))

    engine = cpu._Engine()
    keys = [small_key(i) for i in range(cpu.K_TABLES_PER_PROCESS + 2)]
    for pk in keys:
        engine.table(pk, 4)
    engine.table(keys[2], 4)  # recently used: kept
    assert len(engine._tables) == cpu.K_TABLES_PER_PROCESS
    assert keys[0].n not in engine._tables and keys[2].n in engine._tables
    pk = keys[0]
    assert engine.table(pk, 4).power(5) == engine.table(pk, 4).power(5)  # rebuilt on use
