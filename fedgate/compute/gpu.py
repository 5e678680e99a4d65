"""The GPU backend: Montgomery kernels from ``kernels/montgomery.h`` run element-parallel on a device.

The host side here is written once against :class:`KernelDevice`. Two devices implement it:

* :class:`CupyDevice`: NVRTC compiles ``montgomery.h`` at run time (CuPy ``RawModule``), one thread per
  element, limb arrays stay ``uint32`` from the wire to the device and back (no per-element int
  conversion on the hot path);
* :class:`fedgate.compute.ckernels.CDevice`: the same source built with ``cc`` and called through
  ctypes. CI runs the conformance suite on it, so the host logic below is tested without a GPU.

What runs where: encryption draws the randomness on the host from :mod:`secrets` (a uniform r < n by
rejection, or a uniform short DJN exponent) and ships it as limbs; the device does all modular
arithmetic: ``(1 + m n) * r^n`` (textbook) or ``(1 + m n) * prod table[i][digit_i(a)]`` (DJN fixed
base, table built once per key on the host in Montgomery form), CRT decryption, add and scalar
multiply (``c^k``; scalars above n/2 use the full exponent, a valid but slower encryption of k*m).
The secret key, when given to ``encrypt``, is not used: the device path is the same for the owner.

Rules: CuPy is imported only inside :class:`CupyDevice`; GPU runtime errors become
:class:`~fedgate.errors.LocalError`; key-derived device arrays are cached per key in the backend and
dropped by :meth:`GpuBackend.forget`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from importlib import resources
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedgate.compute.api import BackendStats, check_same_count, check_width
from fedgate.compute.config import ComputeConfig
from fedgate.compute.djn import DjnTable
from fedgate.compute.limbs import LimbBuffer, limbs_for_bits
from fedgate.compute.paillier import PublicKey, SecretKey
from fedgate.errors import InvalidRequestError, LocalError

__all__ = [
    "K_GPU_WINDOW",
    "CupyDevice",
    "GpuBackend",
    "KernelDevice",
    "create",
    "decrypt_key_blob",
    "device_available",
    "kernel_source",
    "mont_context",
]

U32 = npt.NDArray[np.uint32]
K_GPU_WINDOW = 8  # bits per window of the device-side DJN fixed-base table
K_THREADS = 128  # threads per block
K_LIMB_VARIANTS = (32, 64, 128)  # FG_MAX_LIMBS values compiled on demand


def kernel_source() -> str:
    """The text of ``kernels/montgomery.h``."""
    return resources.files("fedgate.compute.kernels").joinpath("montgomery.h").read_text(encoding="utf-8")


def max_limbs_for(nl: int) -> int:
    """Smallest compiled FG_MAX_LIMBS variant that holds ``nl`` limbs."""
    for variant in K_LIMB_VARIANTS:
        if nl <= variant:
            return variant
    raise InvalidRequestError(f"moduli above {K_LIMB_VARIANTS[-1] * 32} bits are not supported on this backend")


def limbs_of(value: int, width: int) -> U32:
    """One int as a little-endian uint32 array."""
    return np.frombuffer(int(value).to_bytes(width * 4, "little"), dtype="<u4").astype(np.uint32)


def mont_context(m: int, nl: int) -> U32:
    """``m | R^2 | R^4 | R mod m | -m^-1 mod 2^32`` for R = 2^(32 nl) (see montgomery.h rule 4)."""
    if m % 2 == 0 or m.bit_length() > 32 * nl:
        raise InvalidRequestError("Montgomery moduli must be odd and fit their width")
    r = 1 << (32 * nl)
    minv = (-pow(m, -1, 1 << 32)) % (1 << 32)
    parts = [limbs_of(m, nl), limbs_of(r * r % m, nl), limbs_of(pow(r, 4, m), nl), limbs_of(r % m, nl)]
    return np.concatenate([*parts, np.array([minv], dtype=np.uint32)])


def decrypt_key_blob(sk: SecretKey) -> tuple[U32, int, int]:
    """The CRT key blob of ``fg_decrypt`` and its widths (nh, ph)."""
    nh = sk.public.plain_width
    ph = limbs_for_bits(sk.q.bit_length())
    p, q = sk.p, sk.q
    tail = [p - 1, q - 1, pow(p, -1, 1 << (32 * ph)), pow(q, -1, 1 << (32 * ph)), sk.hp, sk.hq, sk.p_inv_q]
    blob = np.concatenate(
        [mont_context(sk.p2, nh), mont_context(sk.q2, nh), mont_context(p, ph), mont_context(q, ph)]
        + [limbs_of(v, ph) for v in tail]
    )
    return blob, nh, ph


def as_array(buf: LimbBuffer) -> U32:
    """A buffer's limbs as a (count, width) uint32 view."""
    return np.frombuffer(buf.data, dtype="<u4").reshape(buf.count, buf.width).astype(np.uint32, copy=False)


def to_buffer(arr: U32, width: int) -> LimbBuffer:
    """A (count, width) array back into a buffer."""
    return LimbBuffer(np.ascontiguousarray(arr, dtype="<u4").tobytes(), width)


def less_than(rows: U32, bound: int) -> npt.NDArray[np.bool_]:
    """Row-wise ``value < bound`` for (count, width) limb rows, without int conversion."""
    width = rows.shape[1]
    if bound.bit_length() > 32 * width:
        return np.ones(rows.shape[0], dtype=bool)
    limit = limbs_of(bound, width)
    lt = np.zeros(rows.shape[0], dtype=bool)
    eq = np.ones(rows.shape[0], dtype=bool)
    for i in range(width - 1, -1, -1):
        lt |= eq & (rows[:, i] < limit[i])
        eq &= rows[:, i] == limit[i]
    return lt


def random_below(bound: int, count: int, width: int) -> U32:
    """``count`` uniform values in [1, bound) as limb rows (rejection sampling from :mod:`secrets`)."""
    bits = bound.bit_length()
    top_mask = np.uint32((1 << (bits - 32 * (limbs_for_bits(bits) - 1))) - 1)
    out = np.zeros((count, width), dtype=np.uint32)
    todo = np.arange(count)
    nb = limbs_for_bits(bits)
    while todo.size:
        raw = np.frombuffer(secrets.token_bytes(todo.size * nb * 4), dtype="<u4").reshape(todo.size, nb).copy()
        raw[:, nb - 1] &= top_mask
        rows = np.zeros((todo.size, width), dtype=np.uint32)
        rows[:, :nb] = raw
        ok = less_than(rows, bound) & rows.any(axis=1)
        out[todo[ok]] = rows[ok]
        todo = todo[~ok]
    return out


class KernelDevice(Protocol):
    """Runs the batch entry points of montgomery.h."""

    @property
    def name(self) -> str:
        """What runs the kernels."""
        ...

    def upload(self, arr: U32) -> Any:
        """Copy a constant array to the device once; the handle is passed back in ``run`` args."""
        ...

    def run(self, kernel: str, count: int, out_shape: tuple[int, int], args: Sequence[Any], *, max_limbs: int) -> U32:
        """Launch ``kernel(out, *args)`` over ``count`` elements; return ``out`` on the host."""
        ...


class CupyDevice:
    """NVRTC-compiled kernels on a CUDA device (CuPy)."""

    def __init__(self, device_id: int = 0) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise LocalError(f"the gpu backend needs CuPy (pip install 'fedgate[gpu]'): {exc}") from exc
        self._cp: Any = cupy
        try:
            self._device = cupy.cuda.Device(device_id)
            self._device.use()
            props = cupy.cuda.runtime.getDeviceProperties(device_id)
        except Exception as exc:
            raise LocalError(f"CUDA device {device_id} is not usable: {exc}") from exc
        raw_name = props.get("name", b"CUDA device")
        self._name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        self._modules: dict[int, Any] = {}
        self._source = kernel_source()

    @property
    def name(self) -> str:
        return self._name

    def _module(self, max_limbs: int) -> Any:
        module = self._modules.get(max_limbs)
        if module is None:
            try:
                module = self._cp.RawModule(code=self._source, options=(f"-DFG_MAX_LIMBS={max_limbs}",))
                module.compile()
            except Exception as exc:
                raise LocalError(f"compiling the HE kernels failed: {exc}") from exc
            self._modules[max_limbs] = module
        return module

    def upload(self, arr: U32) -> Any:
        return self._cp.asarray(arr)

    def run(self, kernel: str, count: int, out_shape: tuple[int, int], args: Sequence[Any], *, max_limbs: int) -> U32:
        cp = self._cp
        try:
            out = cp.zeros(out_shape, dtype=cp.uint32)
            if count:
                fn = self._module(max_limbs).get_function(kernel)
                dev_args = [out]
                for a in args:
                    if isinstance(a, np.ndarray):
                        dev_args.append(cp.asarray(a))
                    elif isinstance(a, int):
                        dev_args.append(np.int32(a))
                    else:
                        dev_args.append(a)
                blocks = (count + K_THREADS - 1) // K_THREADS
                fn((blocks,), (K_THREADS,), tuple(dev_args))
            result: U32 = cp.asnumpy(out)
            return result
        except LocalError:
            raise
        except Exception as exc:
            raise LocalError(f"GPU kernel {kernel} failed: {exc}") from exc


def device_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


class _KeyState:
    __slots__ = ("ctx_n2", "djn_exp_bits", "djn_nwin", "djn_table", "n_limbs")

    def __init__(self) -> None:
        self.ctx_n2: Any = None
        self.n_limbs: Any = None
        self.djn_table: Any = None
        self.djn_nwin = 0
        self.djn_exp_bits = 0


class GpuBackend:
    """Batch Paillier on a :class:`KernelDevice`."""

    def __init__(self, config: ComputeConfig, device: KernelDevice, *, name: str = "gpu") -> None:
        self._config = config
        self._device = device
        self._name = name
        self._keys: dict[int, _KeyState] = {}
        self._secret: dict[int, tuple[Any, int, int]] = {}
        self._lock = threading.Lock()
        self._counts = {"enc": 0, "dec": 0, "eval": 0}

    @property
    def name(self) -> str:
        return self._name

    def _key(self, pk: PublicKey) -> _KeyState:
        with self._lock:
            state = self._keys.get(pk.n)
            if state is None:
                state = self._keys[pk.n] = _KeyState()
                state.ctx_n2 = self._device.upload(mont_context(pk.n2, pk.cipher_width))
                state.n_limbs = self._device.upload(limbs_of(pk.n, pk.plain_width))
            return state

    def _djn(self, pk: PublicKey, state: _KeyState) -> None:
        if state.djn_table is not None:
            return
        table = DjnTable(pk, window=K_GPU_WINDOW)
        rows = table.montgomery_rows(pk.cipher_width)
        flat = [v for row in rows for v in row]
        arr = np.frombuffer(b"".join(v.to_bytes(pk.cipher_width * 4, "little") for v in flat), dtype="<u4").astype(
            np.uint32
        )
        state.djn_table = self._device.upload(arr)
        state.djn_nwin = len(rows)
        state.djn_exp_bits = table.exponent_bits


    def _run(self, kernel: str, count: int, out_shape: tuple[int, int], args: Sequence[Any], nl: int) -> U32:
        return self._device.run(kernel, count, out_shape, args, max_limbs=max_limbs_for(nl))

    def encrypt(
        self, pk: PublicKey, plaintexts: LimbBuffer, *, sk: SecretKey | None = None, obfuscate: bool = True
    ) -> LimbBuffer:
        check_width(plaintexts, pk.plain_width, "plaintexts")
        if sk is not None and sk.public != pk:
            raise InvalidRequestError("secret key does not match the public key")
        msgs = as_array(plaintexts)
        if not less_than(msgs, pk.n).all():
            raise InvalidRequestError("plaintext is not a residue mod n")
        count, nh, nl = plaintexts.count, pk.plain_width, pk.cipher_width
        self._counts["enc"] += count
        state = self._key(pk)
        shape = (count, nl)
        if count == 0:
            return LimbBuffer(b"", nl)
        if not obfuscate:
            out = self._run("fg_encode", count, shape, [msgs, state.n_limbs, nh, count], nl)
        elif self._config.short_exponent:
            self._djn(pk, state)
            el = limbs_for_bits(state.djn_exp_bits)
            a = np.frombuffer(secrets.token_bytes(count * el * 4), dtype="<u4").reshape(count, el).copy()
            spare = 32 * el - state.djn_exp_bits
            if spare:
                a[:, el - 1] &= np.uint32((1 << (32 - spare)) - 1)
            args = [msgs, a, el, state.djn_table, K_GPU_WINDOW, state.djn_nwin, state.n_limbs, state.ctx_n2, nh, count]
            out = self._run("fg_encrypt_fixed_base", count, shape, args, nl)
        else:
            r = random_below(pk.n, count, nl)
            args = [msgs, r, nl, state.n_limbs, 0, nh, state.n_limbs, state.ctx_n2, nh, count]
            out = self._run("fg_encrypt", count, shape, args, nl)
        return to_buffer(out, nl)

    def decrypt(self, sk: SecretKey, ciphertexts: LimbBuffer) -> LimbBuffer:
        pk = sk.public
        check_width(ciphertexts, pk.cipher_width, "ciphertexts")
        count = ciphertexts.count
        self._counts["dec"] += count
        with self._lock:
            entry = self._secret.get(pk.n)
            if entry is None:
                blob, nh, ph = decrypt_key_blob(sk)
                entry = self._secret[pk.n] = (self._device.upload(blob), nh, ph)
        blob_dev, nh, ph = entry
        out = self._run("fg_decrypt", count, (count, nh), [as_array(ciphertexts), blob_dev, nh, ph, count], nh)
        return to_buffer(out, nh)

    def add(self, pk: PublicKey, a: LimbBuffer, b: LimbBuffer) -> LimbBuffer:
        check_width(a, pk.cipher_width, "ciphertexts")
        check_width(b, pk.cipher_width, "ciphertexts")
        check_same_count(a, b)
        self._counts["eval"] += a.count
        nl = pk.cipher_width
        state = self._key(pk)
        out = self._run("fg_mulmod", a.count, (a.count, nl), [as_array(a), as_array(b), state.ctx_n2, nl, a.count], nl)
        return to_buffer(out, nl)

    def mul_scalar(self, pk: PublicKey, ciphertexts: LimbBuffer, scalars: LimbBuffer) -> LimbBuffer:
        check_width(ciphertexts, pk.cipher_width, "ciphertexts")
        check_width(scalars, pk.plain_width, "scalars")
        check_same_count(ciphertexts, scalars)
        ks = as_array(scalars)
        if not less_than(ks, pk.n).all():
            raise InvalidRequestError("scalar is not a residue mod n")
        count, nh, nl = scalars.count, pk.plain_width, pk.cipher_width
        self._counts["eval"] += count
        state = self._key(pk)
        args = [as_array(ciphertexts), nl, nl, ks, nh, nh, state.ctx_n2, nl, count]
        return to_buffer(self._run("fg_powm", count, (count, nl), args, nl), nl)

    def powm(self, base: LimbBuffer, exponent: LimbBuffer, modulus: int) -> LimbBuffer:
        if modulus < 3 or modulus % 2 == 0 or modulus.bit_length() > base.width * 32:
            raise InvalidRequestError("modulus must be odd, > 2 and fit the base width")
        check_same_count(base, exponent)
        nl = limbs_for_bits(modulus.bit_length())
        if base.width > 2 * nl:
            raise InvalidRequestError("base width may be at most twice the modulus width on this backend")
        count = base.count
        self._counts["eval"] += count
        ctx = mont_context(modulus, nl)
        args = [
            as_array(base),
            base.width,
            base.width,
            as_array(exponent),
            exponent.width,
            exponent.width,
            ctx,
            nl,
            count,
        ]
        out = self._run("fg_powm", count, (count, nl), args, nl)
        padded = np.zeros((count, base.width), dtype=np.uint32)
        padded[:, :nl] = out
        return to_buffer(padded, base.width)

    def forget(self, pk: PublicKey) -> None:
        """Drop the device arrays derived from a key."""
        with self._lock:
            self._keys.pop(pk.n, None)
            self._secret.pop(pk.n, None)

    def statistics(self) -> BackendStats:
        c = self._counts
        return BackendStats(self._name, self._device.name, c["enc"], c["dec"], c["eval"], 0)

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
            self._secret.clear()


def create(config: ComputeConfig) -> GpuBackend:
    """Registry factory: CuPy on ``config.gpu_device``."""
    return GpuBackend(config, CupyDevice(config.gpu_device))
