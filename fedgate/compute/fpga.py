"""The FPGA backend: the interface a vendor card plugs into, its loader, and a software device.

No real FPGA card has been tested with this code. What exists and is tested in CI: the device
interface below, the Paillier logic on top of it (:class:`FpgaBackend`), the loader's error messages,
and a software device that implements the interface with gmpy2 (it runs the conformance suite).

A card offers two batch primitives on fixed-width little-endian 32-bit limb buffers, asynchronously
(``submit`` returns a job id at once, ``wait`` blocks for the result), the way FATE's own FPGA engine
drove a vendor ``.so`` through ctypes:

    POWM    out[i] = a[i] ^ b[i] mod m       (a stride 0: one shared base; b stride 0: one exponent)
    MULMOD  out[i] = a[i] * b[i] mod m

A vendor library plugs in through :class:`VendorLibraryDevice`, which expects this C ABI:

    int  fg_fpga_open(const char *device);                          /* handle >= 0, < 0 on error */
    long fg_fpga_submit(int h, int op, const uint32_t *a, int a_stride, const uint32_t *b, int b_stride,
                        int b_width, const uint32_t *m, int width, int count, uint32_t *out);
    int  fg_fpga_wait(int h, long job, int timeout_ms);                /* 0 when ``out`` is filled */
    void fg_fpga_close(int h);

(op 0 = POWM, 1 = MULMOD; ``width`` limbs per a, m and out element; ``b_width`` limbs per b element.)
Xilinx hosts would reach a card through XRT (``pyxrt``) or OpenCL (``pyopencl``); the loader reports
which of these are importable, to say plainly what is missing.

Rules: the host keeps the small steps (1 + m*n, L(x), CRT join, inverses for negative scalars) and the
card does every modular exponentiation and multiplication; randomness comes from :mod:`secrets` on the
host; a device error becomes :class:`~fedgate.errors.LocalError`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import queue
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import gmpy2

from fedgate.compute.api import BackendStats, check_same_count, check_width
from fedgate.compute.config import ComputeConfig
from fedgate.compute.djn import DjnTable
from fedgate.compute.limbs import LimbBuffer, from_limbs, limbs_for_bits, to_limbs
from fedgate.compute.paillier import PublicKey, SecretKey, invert_ciphertext
from fedgate.errors import InvalidRequestError, LocalError

__all__ = [
    "K_VENDOR_SYMBOLS",
    "FpgaBackend",
    "FpgaDevice",
    "FpgaJob",
    "SoftwareFpgaDevice",
    "VendorLibraryDevice",
    "create",
    "load_device",
]

Op = Literal["powm", "mulmod"]
K_VENDOR_SYMBOLS = ("fg_fpga_open", "fg_fpga_submit", "fg_fpga_wait", "fg_fpga_close")
K_WAIT_MS = 60_000  # ms a batch may take on the card before we call it lost
K_SOFT_MAX_BATCH = 4096  # elements per job on the software device


@dataclass(frozen=True, slots=True)
class FpgaJob:
    """One batch for the card: all buffers are fixed-width limb bytes."""

    op: Op
    """``powm`` or ``mulmod``."""
    a: bytes
    """Bases (powm) or left factors (mulmod); one element when ``a_stride`` is 0."""
    a_stride: int
    """Limbs between consecutive a elements (0: shared)."""
    b: bytes
    """Exponents (powm) or right factors (mulmod); one element when ``b_stride`` is 0."""
    b_stride: int
    """Limbs between consecutive b elements (0: shared)."""
    b_width: int
    """Limbs per b element."""
    modulus: bytes
    """The odd modulus, ``width`` limbs."""
    width: int
    """Limbs per a, modulus and output element."""
    count: int
    """Elements."""


class FpgaDevice(Protocol):
    """A card (or an emulation of one)."""

    @property
    def name(self) -> str:
        """Card name for statistics."""
        ...

    @property
    def max_batch(self) -> int:
        """Most elements one job may carry."""
        ...

    def submit(self, job: FpgaJob) -> int:
        """Queue a job; returns its id at once."""
        ...

    def wait(self, job_id: int, *, timeout_ms: int) -> bytes:
        """Block until the job is done; its output (``count * width`` limbs)."""
        ...

    def close(self) -> None:
        """Release the card."""
        ...


def _element(data: bytes, stride: int, width: int, index: int) -> int:
    start = index * stride * 4
    return int.from_bytes(data[start : start + width * 4], "little")


class SoftwareFpgaDevice:
    """The card interface in software (gmpy2 on one background thread): CI's stand-in for a card."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[int, FpgaJob] | None] = queue.Queue()
        self._done: dict[int, bytes | BaseException] = {}
        self._cond = threading.Condition()
        self._next = 0
        self._thread = threading.Thread(target=self._serve, name="fpga-soft", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return "software FPGA emulator"

    @property
    def max_batch(self) -> int:
        return K_SOFT_MAX_BATCH

    def submit(self, job: FpgaJob) -> int:
        if job.count > self.max_batch:
            raise InvalidRequestError(f"job of {job.count} elements exceeds the card's {self.max_batch}")
        with self._cond:
            self._next += 1
            job_id = self._next
        self._jobs.put((job_id, job))
        return job_id

    def _serve(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job_id, job = item
            result: bytes | BaseException
            try:
                result = self._execute(job)
            except BaseException as exc:  # reported to the waiter
                result = exc
            with self._cond:
                self._done[job_id] = result
                self._cond.notify_all()

    @staticmethod
    def _execute(job: FpgaJob) -> bytes:
        m = int.from_bytes(job.modulus, "little")
        out = []
        for i in range(job.count):
            a = _element(job.a, job.a_stride, job.width, i)
            b = _element(job.b, job.b_stride, job.b_width, i)
            out.append(gmpy2.powmod(a, b, m) if job.op == "powm" else gmpy2.mpz(a) * b % m)
        return to_limbs(out, job.width).data

    def wait(self, job_id: int, *, timeout_ms: int) -> bytes:
        with self._cond:
            if not self._cond.wait_for(lambda: job_id in self._done, timeout=timeout_ms / 1000):
                raise LocalError(f"FPGA job {job_id} did not finish within {timeout_ms} ms")
            result = self._done.pop(job_id)
        if isinstance(result, BaseException):
            raise LocalError(f"FPGA job {job_id} failed: {result}") from result
        return result

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)


class VendorLibraryDevice:
    """A vendor card behind a shared library with the C ABI in the module docstring (untested: no card)."""

    def __init__(self, library: str, device: str, *, max_batch: int = 65536) -> None:
        self._lib = ctypes.CDLL(library)
        self._name = f"{os.path.basename(library)}:{device}"
        self._max_batch = max_batch
        handle = int(self._lib.fg_fpga_open(device.encode()))
        if handle < 0:
            raise LocalError(f"{library}: fg_fpga_open({device!r}) failed with {handle}")
        self._handle = handle
        self._pending: dict[int, tuple[ctypes.Array[ctypes.c_uint32], list[object]]] = {}
        self._lib.fg_fpga_submit.restype = ctypes.c_long

    @property
    def name(self) -> str:
        return self._name

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def submit(self, job: FpgaJob) -> int:
        def buf(data: bytes) -> ctypes.Array[ctypes.c_uint32]:
            return (ctypes.c_uint32 * (len(data) // 4)).from_buffer_copy(data)

        a, b, m = buf(job.a), buf(job.b), buf(job.modulus)
        out = (ctypes.c_uint32 * (job.count * job.width))()
        op = 0 if job.op == "powm" else 1
        job_id = int(
            self._lib.fg_fpga_submit(
                self._handle, op, a, job.a_stride, b, job.b_stride, job.b_width, m, job.width, job.count, out
            )
        )
        if job_id < 0:
            raise LocalError(f"{self._name}: submit failed with {job_id}")
        self._pending[job_id] = (out, [a, b, m])
        return job_id

    def wait(self, job_id: int, *, timeout_ms: int) -> bytes:
        rc = int(self._lib.fg_fpga_wait(self._handle, ctypes.c_long(job_id), timeout_ms))
        out, _ = self._pending.pop(job_id)
        if rc != 0:
            raise LocalError(f"{self._name}: job {job_id} failed with {rc}")
        return bytes(out)

    def close(self) -> None:
        self._lib.fg_fpga_close(self._handle)


def _missing_runtimes() -> list[str]:
    missing = []
    for module, what in (("pyxrt", "XRT Python bindings (pyxrt)"), ("pyopencl", "OpenCL (pyopencl)")):
        if importlib.util.find_spec(module) is None:
            missing.append(what)
    return missing


def load_device(config: ComputeConfig) -> FpgaDevice:
    """The configured card; raises LocalError naming exactly what is missing."""
    if config.fpga_device == "software":
        return SoftwareFpgaDevice()
    problems = []
    if not config.fpga_library:
        problems.append("compute.fpga_library is not set (path of the vendor's shared library)")
    elif not os.path.exists(config.fpga_library):
        problems.append(f"vendor library {config.fpga_library!r} does not exist")
    else:
        try:
            lib = ctypes.CDLL(config.fpga_library)
        except OSError as exc:
            problems.append(f"vendor library {config.fpga_library!r} cannot be loaded: {exc}")
        else:
            absent = [s for s in K_VENDOR_SYMBOLS if not hasattr(lib, s)]
            if absent:
                problems.append(f"vendor library lacks the symbols {absent}")
    if not config.fpga_device:
        problems.append("compute.fpga_device is not set (vendor device name; 'software' for the emulator)")
    if problems:
        runtimes = _missing_runtimes()
        if runtimes:
            problems.append("not importable here: " + ", ".join(runtimes))
        raise LocalError("fpga backend unavailable: " + "; ".join(problems))
    return VendorLibraryDevice(config.fpga_library, config.fpga_device)


class FpgaBackend:
    """Paillier on a card's POWM / MULMOD batch primitives."""

    def __init__(self, config: ComputeConfig, device: FpgaDevice) -> None:
        self._config = config
        self._device = device
        self._tables: dict[int, DjnTable] = {}
        self._counts = {"enc": 0, "dec": 0, "eval": 0}

    @property
    def name(self) -> str:
        return "fpga"

    def _batch(
        self,
        op: Op,
        a: Sequence[int],
        a_shared: bool,
        b: Sequence[int],
        b_shared: bool,
        b_width: int,
        modulus: int,
        width: int,
        count: int,
    ) -> list[int]:
        """Run one logical batch as as many jobs as the card needs, all submitted before waiting."""
        step = self._device.max_batch
        ids = []
        for start in range(0, count, step):
            stop = min(start + step, count)
            a_part = a[:1] if a_shared else a[start:stop]
            b_part = b[:1] if b_shared else b[start:stop]
            job = FpgaJob(
                op,
                to_limbs(a_part, width).data,
                0 if a_shared else width,
                to_limbs(b_part, b_width).data,
                0 if b_shared else b_width,
                b_width,
                modulus.to_bytes(width * 4, "little"),
                width,
                stop - start,
            )
            ids.append(self._device.submit(job))
        out: list[int] = []
        for job_id in ids:
            out.extend(from_limbs(LimbBuffer(self._device.wait(job_id, timeout_ms=K_WAIT_MS), width)))
        return out


    def encrypt(
        self, pk: PublicKey, plaintexts: LimbBuffer, *, sk: SecretKey | None = None, obfuscate: bool = True
    ) -> LimbBuffer:
        check_width(plaintexts, pk.plain_width, "plaintexts")
        ms = from_limbs(plaintexts)
        if any(m >= pk.n for m in ms):
            raise InvalidRequestError("plaintext is not a residue mod n")
        count, nl = len(ms), pk.cipher_width
        self._counts["enc"] += count
        gms = [1 + m * pk.n for m in ms]
        if not obfuscate or not count:
            return to_limbs(gms, nl)
        if self._config.short_exponent:
            table = self._tables.get(pk.n)
            if table is None:
                table = self._tables[pk.n] = DjnTable(pk, window=1)  # only hs is used on a card
            exps = [secrets.randbits(table.exponent_bits) for _ in range(count)]
            el = limbs_for_bits(table.exponent_bits)
            rns = self._batch("powm", [int(table.hs)], True, exps, False, el, pk.n2, nl, count)
        else:
            rs = [secrets.randbelow(pk.n - 1) + 1 for _ in range(count)]
            rns = self._batch("powm", rs, False, [pk.n], True, pk.plain_width, pk.n2, nl, count)
        return to_limbs(self._batch("mulmod", gms, False, rns, False, nl, pk.n2, nl, count), nl)

    def decrypt(self, sk: SecretKey, ciphertexts: LimbBuffer) -> LimbBuffer:
        pk = sk.public
        check_width(ciphertexts, pk.cipher_width, "ciphertexts")
        cs = from_limbs(ciphertexts)
        count, nh = len(cs), pk.plain_width
        self._counts["dec"] += count
        halves = []
        for prime, square, h, exp in ((sk.p, sk.p2, sk.hp, sk.p - 1), (sk.q, sk.q2, sk.hq, sk.q - 1)):
            xs = self._batch("powm", [c % square for c in cs], False, [exp], True, nh, square, nh, count)
            halves.append([(x - 1) // prime * h % prime for x in xs])
        p, q = sk.p, sk.q
        ms = [mp + p * ((mq - mp) * sk.p_inv_q % q) for mp, mq in zip(*halves)]
        return to_limbs(ms, nh)

    def add(self, pk: PublicKey, a: LimbBuffer, b: LimbBuffer) -> LimbBuffer:
        check_width(a, pk.cipher_width, "ciphertexts")
        check_width(b, pk.cipher_width, "ciphertexts")
        check_same_count(a, b)
        self._counts["eval"] += a.count
        nl = pk.cipher_width
        return to_limbs(self._batch("mulmod", from_limbs(a), False, from_limbs(b), False, nl, pk.n2, nl, a.count), nl)

    def mul_scalar(self, pk: PublicKey, ciphertexts: LimbBuffer, scalars: LimbBuffer) -> LimbBuffer:
        check_width(ciphertexts, pk.cipher_width, "ciphertexts")
        check_width(scalars, pk.plain_width, "scalars")
        check_same_count(ciphertexts, scalars)
        cs, ks = from_limbs(ciphertexts), from_limbs(scalars)
        if any(k >= pk.n for k in ks):
            raise InvalidRequestError("scalar is not a residue mod n")
        self._counts["eval"] += len(ks)
        # negative scalars (k > n/2): invert on the host, short exponent n - k on the card (as FATE does)
        bases = [int(invert_ciphertext(pk, c)) if k > pk.max_int else c for c, k in zip(cs, ks)]
        exps = [pk.n - k if k > pk.max_int else k for k in ks]
        nl, nh = pk.cipher_width, pk.plain_width
        return to_limbs(self._batch("powm", bases, False, exps, False, nh, pk.n2, nl, len(ks)), nl)

    def powm(self, base: LimbBuffer, exponent: LimbBuffer, modulus: int) -> LimbBuffer:
        if modulus < 3 or modulus % 2 == 0 or modulus.bit_length() > base.width * 32:
            raise InvalidRequestError("modulus must be odd, > 2 and fit the base width")
        check_same_count(base, exponent)
        self._counts["eval"] += base.count
        out = self._batch(
            "powm",
            from_limbs(base),
            False,
            from_limbs(exponent),
            False,
            exponent.width,
            modulus,
            base.width,
            base.count,
        )
        return to_limbs(out, base.width)

    def statistics(self) -> BackendStats:
        c = self._counts
        return BackendStats("fpga", self._device.name, c["enc"], c["dec"], c["eval"], 0)

    def close(self) -> None:
        self._device.close()


def create(config: ComputeConfig) -> FpgaBackend:
    """Registry factory: the card named by ``compute.fpga_library`` / ``compute.fpga_device``."""
    return FpgaBackend(config, load_device(config))
