"""``python -m fedgate.compute.gpu_check`` (``make gpu-check``): GPU correctness and speed in one run.

For 1024- and 2048-bit keys it (1) runs the conformance suite on the gpu backend, (2) cross-checks
against the cpu backend (GPU ciphertexts decrypt on the CPU and back; add and small-scalar multiply
agree bit for bit), then (3) prints kops for encrypt (DJN fixed base and textbook), decrypt, add and
64-bit scalar multiply, end to end from limb buffers (host randomness, copies and launches included),
beside the in-process cpu backend (one core) measured in the same run. Exit status 0 means every
check passed; 2 means no usable CUDA device.

Randomness is fresh for every ciphertext (``secrets`` on the host); nothing is reused between runs.
"""

from __future__ import annotations

import argparse
import pathlib
import secrets
import sys
import time
from collections.abc import Callable, Sequence

from fedgate.compute.api import HeBackend
from fedgate.compute.config import ComputeConfig
from fedgate.compute.cpu import CpuBackend
from fedgate.compute.limbs import LimbBuffer, to_limbs
from fedgate.compute.paillier import PublicKey, SecretKey, generate_keypair
from fedgate.compute.testing import check_backend
from fedgate.errors import FedgateError

__all__ = ["main"]

K_MIN_SECONDS = 1.0  # a timed batch grows until one run takes this long
K_MAX_BATCH = 1 << 18  # elements


def _rate(
    prep: Callable[[int], object], fn: Callable[[object], object], start: int, min_seconds: float
) -> tuple[float, int]:
    """kops of ``fn(prep(count))`` (only ``fn`` timed), doubling ``count`` until a run lasts ``min_seconds``."""
    count = start
    while True:
        data = prep(count)
        t0 = time.perf_counter()
        fn(data)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or count >= K_MAX_BATCH:
            return count / elapsed / 1000.0, count
        count *= 2


def _plain(pk_n: int, width: int, count: int) -> LimbBuffer:
    return to_limbs((secrets.randbelow(pk_n) for _ in range(count)), width)


def _timings(
    pk: PublicKey,
    sk: SecretKey,
    gpu_djn: HeBackend,
    gpu_txt: HeBackend,
    cpu: CpuBackend,
    *,
    start: int,
    min_seconds: float,
) -> list[tuple[str, float, int, float]]:
    """(op, gpu kops, gpu batch, cpu kops) rows for one key."""
    rows: list[tuple[str, float, int, float]] = []
    cpu_txt = CpuBackend(ComputeConfig(workers=1, short_exponent=False))

    def plain(k: int) -> object:
        return _plain(pk.n, pk.plain_width, k)

    def cts(k: int) -> object:
        return cpu.encrypt(pk, _plain(pk.n, pk.plain_width, k), obfuscate=False)

    def pairs(k: int) -> object:
        c = cts(k)
        return c, c

    def with_scalars(k: int) -> object:
        return cts(k), to_limbs((secrets.randbits(64) for _ in range(k)), pk.plain_width)

    def call(fn: Callable[..., object]) -> Callable[[object], object]:
        return lambda d: fn(*d) if isinstance(d, tuple) else fn(d)

    Op = tuple[str, Callable[[int], object], Callable[[object], object], Callable[[object], object], int]
    ops: list[Op] = [
        (
            "encrypt (DJN fixed base)",
            plain,
            call(lambda d: gpu_djn.encrypt(pk, d)),
            call(lambda d: cpu.encrypt(pk, d)),
            64,
        ),
        (
            "encrypt (textbook r^n)",
            plain,
            call(lambda d: gpu_txt.encrypt(pk, d)),
            call(lambda d: cpu_txt.encrypt(pk, d)),
            16,
        ),
        ("decrypt (CRT)", cts, call(lambda d: gpu_djn.decrypt(sk, d)), call(lambda d: cpu.decrypt(sk, d)), 64),
        ("add", pairs, call(lambda a, b: gpu_djn.add(pk, a, b)), call(lambda a, b: cpu.add(pk, a, b)), 4096),
        (
            "mul 64-bit scalar",
            with_scalars,
            call(lambda c, k: gpu_djn.mul_scalar(pk, c, k)),
            call(lambda c, k: cpu.mul_scalar(pk, c, k)),
            256,
        ),
    ]
    for label, prep, gfn, cfn, cpu_start in ops:
        gfn(prep(min(256, start)))  # warm-up: kernel compilation, key tables
        g_kops, g_n = _rate(prep, gfn, start, min_seconds)
        c_start = cpu_start if pk.bits <= 1024 else max(8, cpu_start // 8)
        c_kops, _ = _rate(prep, cfn, c_start, min_seconds)
        rows.append((label, g_kops, g_n, c_kops))
    cpu_txt.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedgate-gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[1024, 2048], help="key sizes")
    parser.add_argument("--device", type=int, default=0, help="CUDA device ordinal")
    parser.add_argument("--quick", action="store_true", help="correctness only, no timings")
    parser.add_argument("--min-seconds", type=float, default=K_MIN_SECONDS, help="shortest timed run")
    parser.add_argument("--start", type=int, default=4096, help="first timed batch size on the device")
    parser.add_argument(
        "--emulate", metavar="DIR", help="run the kernels as plain C built in DIR instead of CUDA (tests)"
    )
    args = parser.parse_args(argv)

    from fedgate.compute import gpu

    device: gpu.KernelDevice
    if args.emulate:
        from fedgate.compute.ckernels import CDevice

        device = CDevice(pathlib.Path(args.emulate))
    elif not gpu.device_available():
        print("gpu-check: no CUDA device visible to CuPy (pip install 'fedgate[gpu]' on a GPU host)")
        return 2
    else:
        try:
            device = gpu.CupyDevice(args.device)
        except FedgateError as exc:
            print(f"gpu-check: {exc}")
            return 2
    print(f"gpu-check on {device.name}")
    gpu_djn = gpu.GpuBackend(ComputeConfig(short_exponent=True), device)
    gpu_txt = gpu.GpuBackend(ComputeConfig(short_exponent=False), device)
    cpu = CpuBackend(ComputeConfig(workers=1))
    failures = 0
    for bits in args.bits:
        pk, sk = generate_keypair(bits)
        try:
            check_backend(gpu_djn, [(pk, sk)])
            check_backend(gpu_txt, [(pk, sk)])
            ms = _plain(pk.n, pk.plain_width, 512)
            g_ct = gpu_djn.encrypt(pk, ms)
            assert cpu.decrypt(sk, g_ct).data == ms.data, "cpu cannot decrypt gpu ciphertexts"
            c_ct = cpu.encrypt(pk, ms)
            assert gpu_djn.decrypt(sk, c_ct).data == ms.data, "gpu cannot decrypt cpu ciphertexts"
            assert gpu_djn.add(pk, g_ct, c_ct).data == cpu.add(pk, g_ct, c_ct).data, "add differs"
            ks = to_limbs((secrets.randbits(64) for _ in range(512)), pk.plain_width)
            assert gpu_djn.mul_scalar(pk, c_ct, ks).data == cpu.mul_scalar(pk, c_ct, ks).data, "mul differs"
            print(f"[{bits}] correctness: conformance suite (djn + textbook) and cpu cross-checks passed")
        except (AssertionError, FedgateError) as exc:
            failures += 1
            print(f"[{bits}] FAILED: {exc}")
            continue
        if args.quick:
            continue
        rows = _timings(pk, sk, gpu_djn, gpu_txt, cpu, start=args.start, min_seconds=args.min_seconds)
        print(f"[{bits}] {'op':<26} {'gpu kops':>10} {'batch':>8} {'cpu 1-core kops':>16} {'gpu/cpu':>8}")
        for label, g_kops, g_n, c_kops in rows:
            print(f"[{bits}] {label:<26} {g_kops:>10.1f} {g_n:>8} {c_kops:>16.2f} {g_kops / c_kops:>8.1f}")
    cpu.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
