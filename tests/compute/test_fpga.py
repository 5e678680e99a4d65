"""The FPGA backend on the software device (no real card exists here), and the loader's messages."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from fedgate.compute.api import create_backend
from fedgate.compute.config import ComputeConfig
from fedgate.compute.fpga import FpgaBackend, FpgaJob, SoftwareFpgaDevice, load_device
from fedgate.compute.limbs import LimbBuffer, from_limbs, to_limbs
from fedgate.compute.testing import K_CHECKS, Check
from fedgate.errors import InvalidRequestError, LocalError

from .conftest import KeyPair


class SmallBatchDevice(SoftwareFpgaDevice):
    """A card that takes only 5 elements per job, so every batch is split and pipelined."""

    @property
    def max_batch(self) -> int:
        return 5


@pytest.fixture(scope="module", params=[True, False], ids=["djn", "textbook"])
def backend(request: pytest.FixtureRequest) -> Iterator[FpgaBackend]:
    b = FpgaBackend(ComputeConfig(short_exponent=request.param), SmallBatchDevice())
    yield b
    b.close()


@pytest.mark.parametrize("check", K_CHECKS, ids=lambda c: c.__name__)
def test_conformance_on_software_device(check: Check, backend: FpgaBackend, keys1024: KeyPair) -> None:
    pk, sk = keys1024
    check(backend, pk, sk)


def test_registry_builds_the_software_device(keys1024: KeyPair) -> None:
    backend = create_backend(ComputeConfig(backend="fpga", fpga_device="software"))
    try:
        pk, sk = keys1024
        assert backend.name == "fpga" and "software" in backend.statistics().device
        assert from_limbs(backend.decrypt(sk, backend.encrypt(pk, to_limbs([42], pk.plain_width)))) == [42]
    finally:
        backend.close()


def test_submit_wait_is_asynchronous_and_checked() -> None:
    dev = SoftwareFpgaDevice()
    try:
        job = FpgaJob("powm", to_limbs([3], 1).data, 0, to_limbs([5, 6], 1).data, 1, 1, to_limbs([101], 1).data, 1, 2)
        ids = [dev.submit(job), dev.submit(job)]
        assert ids[0] != ids[1]
        out = dev.wait(ids[1], timeout_ms=5000)
        assert from_limbs(LimbBuffer(out, 1)) == [pow(3, 5, 101), pow(3, 6, 101)]
        assert dev.wait(ids[0], timeout_ms=5000) == out
        with pytest.raises(InvalidRequestError):
            dev.submit(FpgaJob("mulmod", b"", 1, b"", 1, 1, b"\x01\0\0\0", 1, dev.max_batch + 1))
        with pytest.raises(LocalError, match="did not finish"):
            dev.wait(999, timeout_ms=10)
    finally:
        dev.close()


def test_loader_names_what_is_missing(tmp_path: pathlib.Path) -> None:
    with pytest.raises(LocalError) as info:
        load_device(ComputeConfig(backend="fpga"))
    text = str(info.value)
    assert "compute.fpga_library is not set" in text and "compute.fpga_device is not set" in text
    with pytest.raises(LocalError, match="does not exist"):
        load_device(ComputeConfig(fpga_library=str(tmp_path / "libvendor.so"), fpga_device="0"))
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(LocalError, match="cannot be loaded"):
        load_device(ComputeConfig(fpga_library=str(bogus), fpga_device="0"))


K_VENDOR_STUB = r"""
/* A toy "vendor library" with the fedgate FPGA ABI, for 1-limb (32-bit) moduli only. */
#include <stdint.h>
static uint32_t mulmod(uint32_t a, uint32_t b, uint32_t m) { return (uint32_t)((uint64_t)a * b % m); }
int fg_fpga_open(const char *device) { return device[0] == '0' ? 7 : -1; }
long fg_fpga_submit(int h, int op, const uint32_t *a, int a_stride, const uint32_t *b, int b_stride,
                    int b_width, const uint32_t *m, int width, int count, uint32_t *out) {
    if (h != 7 || width != 1 || b_width != 1) return -2;
    for (int i = 0; i < count; i++) {
        uint32_t x = a[i * a_stride], y = b[i * b_stride];
        if (op == 1) { out[i] = mulmod(x, y, m[0]); continue; }
        uint32_t r = 1 % m[0];
        while (y) { if (y & 1) r = mulmod(r, x, m[0]); x = mulmod(x, x, m[0]); y >>= 1; }
        out[i] = r;
    }
    return 41;
}
int fg_fpga_wait(int h, long job, int timeout_ms) { return (h == 7 && job == 41 && timeout_ms > 0) ? 0 : -3; }
void fg_fpga_close(int h) { (void)h; }
"""


def test_vendor_library_abi_through_ctypes(tmp_path: pathlib.Path) -> None:
    from fedgate.compute import ckernels

    compiler = ckernels.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH")
    import subprocess

    src = tmp_path / "vendor.c"
    src.write_text(K_VENDOR_STUB)
    lib = tmp_path / "libvendor.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    dev = load_device(ComputeConfig(fpga_library=str(lib), fpga_device="0"))
    try:
        job = FpgaJob("powm", to_limbs([3], 1).data, 0, to_limbs([5, 6], 1).data, 1, 1, to_limbs([101], 1).data, 1, 2)
        out = dev.wait(dev.submit(job), timeout_ms=1000)
        assert out == to_limbs([pow(3, 5, 101), pow(3, 6, 101)], 1).data
        job = FpgaJob("mulmod", to_limbs([7, 8], 1).data, 1, to_limbs([9], 1).data, 0, 1, to_limbs([11], 1).data, 1, 2)
        assert dev.wait(dev.submit(job), timeout_ms=1000) == to_limbs([63 % 11, 72 % 11], 1).data
    finally:
        dev.close()
    with pytest.raises(LocalError, match="fg_fpga_open"):
        load_device(ComputeConfig(fpga_library=str(lib), fpga_device="1"))
    empty = tmp_path / "empty.c"
    empty.write_text("int unrelated(void) { return 0; }\n")
    libempty = tmp_path / "libempty.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(libempty), str(empty)], check=True)
    with pytest.raises(LocalError, match="lacks the symbols"):
        load_device(ComputeConfig(fpga_library=str(libempty), fpga_device="0"))
