"""The GPU kernel source compiled as plain C (cc + ctypes), checked against gmpy2 and the suite."""

from __future__ import annotations

import pathlib
import secrets

import gmpy2
import pytest

from fedgate.compute.config import ComputeConfig
from fedgate.compute.limbs import from_limbs, limbs_for_bits, to_limbs
from fedgate.compute.paillier import decrypt_raw, encrypt_raw, random_rn
from fedgate.compute.testing import K_CHECKS, Check
from fedgate.errors import LocalError

from .conftest import KeyPair

np = pytest.importorskip("numpy")

from fedgate.compute import ckernels  # noqa: E402
from fedgate.compute.gpu import (  # noqa: E402
    GpuBackend,
    decrypt_key_blob,
    less_than,
    mont_context,
    random_below,
)

if ckernels.find_compiler() is None:
    pytest.skip("no C compiler (cc, gcc or clang) on PATH", allow_module_level=True)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> ckernels.CDevice:
    return ckernels.CDevice(tmp_path_factory.mktemp("fgkernels"))


def _rows(values: list[int], width: int) -> object:
    return np.frombuffer(to_limbs(values, width).data, dtype="<u4").reshape(len(values), width)


@pytest.mark.parametrize("bits", [61, 96, 993, 1024, 1025, 2047, 2048])
def test_powm_matches_gmpy2(device: ckernels.CDevice, bits: int) -> None:
    modulus = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    nl = limbs_for_bits(bits)
    count = 6
    bases = [0, 1, modulus - 1] + [secrets.randbits(64 * nl) for _ in range(count - 3)]  # up to R^2
    exps = [0, 1, secrets.randbits(17)] + [secrets.randbits(bits) for _ in range(count - 3)]
    el = limbs_for_bits(bits)
    args = [_rows(bases, 2 * nl), 2 * nl, 2 * nl, _rows(exps, el), el, el, mont_context(modulus, nl), nl, count]
    out = device.run("fg_powm", count, (count, nl), args, max_limbs=64 if nl <= 64 else 128)
    got = [int.from_bytes(row.tobytes(), "little") for row in out]
    assert got == [int(gmpy2.powmod(b, e, modulus)) for b, e in zip(bases, exps)]


def test_mulmod_and_encode(device: ckernels.CDevice, keys1024: KeyPair) -> None:
    pk, _ = keys1024
    nl, nh = pk.cipher_width, pk.plain_width
    a = [secrets.randbelow(pk.n2) for _ in range(5)]
    b = [secrets.randbelow(pk.n2) for _ in range(5)]
    ctx = mont_context(pk.n2, nl)
    out = device.run("fg_mulmod", 5, (5, nl), [_rows(a, nl), _rows(b, nl), ctx, nl, 5], max_limbs=64)
    assert [int.from_bytes(r.tobytes(), "little") for r in out] == [x * y % pk.n2 for x, y in zip(a, b)]
    ms = [0, 1, pk.n - 1]
    n_limbs = _rows([pk.n], nh)[0]  # type: ignore[index]
    out = device.run("fg_encode", 3, (3, nl), [_rows(ms, nh), n_limbs, nh, 3], max_limbs=64)
    assert [int.from_bytes(r.tobytes(), "little") for r in out] == [1 + m * pk.n for m in ms]


@pytest.mark.parametrize("fixture", ["keys1024", "keys2048"])
def test_crt_decrypt_kernel(device: ckernels.CDevice, fixture: str, request: pytest.FixtureRequest) -> None:
    pk, sk = request.getfixturevalue(fixture)
    ms = [0, 1, pk.n - 1, pk.max_int, secrets.randbelow(pk.n)]
    cs = [int(encrypt_raw(pk, m, random_rn(pk))) for m in ms]
    blob, nh, ph = decrypt_key_blob(sk)
    out = device.run("fg_decrypt", 5, (5, nh), [_rows(cs, pk.cipher_width), blob, nh, ph, 5], max_limbs=128)
    assert [int.from_bytes(r.tobytes(), "little") for r in out] == ms


def test_host_helpers() -> None:
    bound = (1 << 100) + 12345
    rows = random_below(bound, 200, 4)
    values = [int.from_bytes(r.tobytes(), "little") for r in rows]
    assert all(0 < v < bound for v in values) and len(set(values)) == 200
    probe = _rows([0, bound - 1, bound, bound + 1, 1 << 127], 4)
    assert list(less_than(probe, bound)) == [True, True, False, False, False]  # type: ignore[arg-type]


@pytest.mark.parametrize("short_exponent", [True, False], ids=["djn-fixed-base", "textbook"])
@pytest.mark.parametrize("check", K_CHECKS, ids=lambda c: c.__name__)
def test_conformance_on_c_kernels(
    check: Check, short_exponent: bool, device: ckernels.CDevice, keys1024: KeyPair
) -> None:
    backend = GpuBackend(ComputeConfig(short_exponent=short_exponent), device, name="gpu-c")
    pk, sk = keys1024
    check(backend, pk, sk)


def test_conformance_on_c_kernels_2048(device: ckernels.CDevice, keys2048: KeyPair) -> None:
    backend = GpuBackend(ComputeConfig(), device, name="gpu-c")
    pk, sk = keys2048
    ms = [0, 5, pk.n - 1]
    cts = backend.encrypt(pk, to_limbs(ms, pk.plain_width))
    assert [int(decrypt_raw(sk, c)) for c in from_limbs(cts)] == ms
    assert from_limbs(backend.decrypt(sk, cts)) == ms
    assert backend.statistics().device.startswith("montgomery.h")


def test_build_failure_is_a_local_error(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckernels, "find_compiler", lambda: None)
    with pytest.raises(LocalError, match="no C compiler"):
        ckernels.build_library(tmp_path, max_limbs=32)


def test_gpu_check_script_runs_on_the_c_emulation(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedgate.compute import gpu_check

    rc = gpu_check.main(["--emulate", str(tmp_path), "--bits", "1024", "--start", "8", "--min-seconds", "0.001"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "correctness: conformance suite (djn + textbook) and cpu cross-checks passed" in out
    for op in ("encrypt (DJN fixed base)", "decrypt (CRT)", "add", "mul 64-bit scalar"):
        assert op in out


def test_gpu_check_without_a_device_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from fedgate.compute import gpu, gpu_check

    if gpu.device_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
