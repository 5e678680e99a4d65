"""The CPU backend against the conformance suite, in-process and over a process pool."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedgate.compute.config import ComputeConfig
from fedgate.compute.cpu import CpuBackend
from fedgate.compute.limbs import from_limbs, to_limbs
from fedgate.compute.paillier import decrypt_raw
from fedgate.compute.testing import K_CHECKS, Check, check_backend

from .conftest import KeyPair

CONFIGS = {
    "djn-inproc": ComputeConfig(workers=1, short_exponent=True),
    "textbook-inproc": ComputeConfig(workers=1, short_exponent=False),
    "djn-2proc-pool": ComputeConfig(workers=2, parallel_min_batch=8, pool_size=16, djn_window=6),
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
