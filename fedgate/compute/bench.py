"""``fedgate bench he``: Paillier throughput of fedgate's backends beside ``phe`` and ``fate_utils``.

Every figure is kops (thousands of operations per second) measured in this one run on this machine,
with fresh randomness for every encryption, so ratios between rows are meaningful even on a noisy
host. "1 core" rows run in this process on one core; the "all cores" rows use the cpu backend's
process pool; the service rows time batches through the gRPC offload service on 127.0.0.1 against
the same backend called in-process. Libraries that are not installed are listed as missing.

    fedgate bench he [--bits 1024 2048] [--seconds 1.0] [--service-batch 10000] [--no-service]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from fedgate.compute.config import ComputeConfig
from fedgate.compute.cpu import CpuBackend
from fedgate.compute.limbs import LimbBuffer, to_limbs
from fedgate.compute.paillier import PublicKey, SecretKey, generate_keypair

__all__ = ["main"]

Row = tuple[str, str, float]  # op, implementation, kops


def _kops(prep: Callable[[int], Any], run: Callable[[Any], object], *, start: int, seconds: float) -> float:
    """kops of ``run(prep(count))`` (only ``run`` timed), doubling count until a run lasts ``seconds``."""
    count = start
    while True:
        data = prep(count)
        t0 = time.perf_counter()
        run(data)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds or count >= 1 << 20:
            return count / elapsed / 1000.0
        count *= 2


def _fedgate_rows(bits: int, pk: PublicKey, sk: SecretKey, seconds: float, workers: int) -> list[Row]:
    rows: list[Row] = []
    n = pk.n

    def plain(k: int) -> LimbBuffer:
        return to_limbs((secrets.randbelow(n) for _ in range(k)), pk.plain_width)

    small = 8 if bits > 1024 else 32
    one = CpuBackend(ComputeConfig(workers=1))
    textbook = CpuBackend(ComputeConfig(workers=1, short_exponent=False))
    pooled = CpuBackend(ComputeConfig(workers=1, pool_size=1 << 16))
    try:
        one.encrypt(pk, plain(1))  # build the DJN table outside the timing
        rows.append(
            (
                "encrypt",
                "fedgate cpu 1 core, DJN fixed base",
                _kops(plain, lambda d: one.encrypt(pk, d), start=small, seconds=seconds),
            )
        )
        rows.append(
            (
                "encrypt",
                "fedgate cpu 1 core, textbook r^n",
                _kops(plain, lambda d: textbook.encrypt(pk, d), start=small, seconds=seconds),
            )
        )
        rows.append(
            (
                "encrypt",
                "fedgate cpu 1 core, owner CRT",
                _kops(plain, lambda d: textbook.encrypt(pk, d, sk=sk), start=small, seconds=seconds),
            )
        )

        def pool_prep(k: int) -> LimbBuffer:
            pooled.forget(pk)
            cfg_pool = pooled  # fill exactly k values, outside the timing
            cfg_pool._config = ComputeConfig(workers=1, pool_size=k)
            cfg_pool.refill_pool(pk)
            return plain(k)

        rows.append(
            (
                "encrypt",
                "fedgate cpu 1 core, online from r^n pool",
                _kops(pool_prep, lambda d: pooled.encrypt(pk, d), start=256, seconds=seconds / 4),
            )
        )

        def cts(k: int) -> LimbBuffer:
            return one.encrypt(pk, plain(k), obfuscate=False)

        rows.append(
            ("decrypt", "fedgate cpu 1 core", _kops(cts, lambda d: one.decrypt(sk, d), start=small, seconds=seconds))
        )
        rows.append(
            (
                "add",
                "fedgate cpu 1 core",
                _kops(lambda k: (cts(k), cts(k)), lambda d: one.add(pk, *d), start=1024, seconds=seconds),
            )
        )

        def with_scalars(k: int) -> tuple[LimbBuffer, LimbBuffer]:
            return cts(k), to_limbs((secrets.randbits(64) for _ in range(k)), pk.plain_width)

        rows.append(
            (
                "mul 64-bit",
                "fedgate cpu 1 core",
                _kops(with_scalars, lambda d: one.mul_scalar(pk, *d), start=64, seconds=seconds),
            )
        )
    finally:
        for b in (one, textbook, pooled):
            b.close()
    if workers > 1:
        many = CpuBackend(ComputeConfig(workers=workers, parallel_min_batch=1))
        try:
            many.encrypt(pk, plain(4 * workers))  # start the processes, build their tables
            many.decrypt(sk, many.encrypt(pk, plain(4 * workers)))
            label = f"fedgate cpu {workers} processes (all cores)"
            rows.append(
                ("encrypt", label, _kops(plain, lambda d: many.encrypt(pk, d), start=small * workers, seconds=seconds))
            )
            rows.append(
                (
                    "decrypt",
                    label,
                    _kops(
                        lambda k: many.encrypt(pk, plain(k), obfuscate=False),
                        lambda d: many.decrypt(sk, d),
                        start=small * workers,
                        seconds=seconds,
                    ),
                )
            )
        finally:
            many.close()
    return rows


def _phe_rows(bits: int, seconds: float) -> list[Row]:
    try:
        from phe import paillier
    except ImportError:
        return [("-", "phe: not installed (pip install phe)", 0.0)]
    pk, sk = paillier.generate_paillier_keypair(n_length=bits)
    small = 8 if bits > 1024 else 32

    def ints(k: int) -> list[int]:
        return [secrets.randbits(62) for _ in range(k)]

    def encs(k: int) -> list[Any]:
        return [pk.encrypt(v) for v in ints(k)]

    rows: list[Row] = [
        ("encrypt", "phe", _kops(ints, lambda d: [pk.encrypt(v) for v in d], start=small, seconds=seconds)),
        ("decrypt", "phe", _kops(encs, lambda d: [sk.decrypt(c) for c in d], start=small, seconds=seconds)),
        (
            "add",
            "phe",
            _kops(lambda k: (encs(k), encs(k)), lambda d: [a + b for a, b in zip(*d)], start=256, seconds=seconds),
        ),
        (
            "mul 64-bit",
            "phe",
            _kops(
                lambda k: (encs(k), [secrets.randbits(63) for _ in range(k)]),
                lambda d: [a * s for a, s in zip(*d)],
                start=64,
                seconds=seconds,
            ),
        ),
    ]
    return rows


def _fate_rows(bits: int, seconds: float) -> list[Row]:
    try:
        import numpy as np
        from fate_utils import paillier as fp
    except ImportError:
        return [("-", "fate_utils: not installed (pip install fate_utils)", 0.0)]
    sk, pk, coder = fp.keygen(bits)
    small = 8 if bits > 1024 else 32

    def vec(k: int) -> Any:
        return coder.encode_i64_vec(np.array([secrets.randbits(62) for _ in range(k)], dtype=np.int64))

    def encs(k: int) -> Any:
        return pk.encrypt_encoded(vec(k), False)

    return [
        ("encrypt", "fate_utils", _kops(vec, lambda d: pk.encrypt_encoded(d, True), start=small, seconds=seconds)),
        ("decrypt", "fate_utils", _kops(encs, lambda d: sk.decrypt_to_encoded(d), start=small, seconds=seconds)),
        (
            "add",
            "fate_utils",
            _kops(lambda k: (encs(k), encs(k)), lambda d: d[0].add(pk, d[1]), start=1024, seconds=seconds),
        ),
        (
            "mul 64-bit",
            "fate_utils",
            _kops(lambda k: (encs(k), vec(k)), lambda d: d[0].mul(pk, d[1]), start=64, seconds=seconds),
        ),
    ]


async def _service_overhead(pk_bits: int, batch: int, workers: int) -> list[tuple[str, float, float]]:
    """(op, in-process seconds, via-service seconds) for one batch of ``batch`` elements."""
    from fedgate.compute.client import HeClient
    from fedgate.compute.service import serve_compute

    config = ComputeConfig(backend="cpu", workers=workers, key_bits=pk_bits, max_batch=max(batch, 1))
    server = await serve_compute(config, listen="127.0.0.1:0", backend=CpuBackend(config))
    out = []
    try:
        backend = server.service.backend
        async with HeClient(f"127.0.0.1:{server.port}", config=config) as he:
            pk = await he.generate_key(pk_bits)
            sk = server.service.keys.secret(pk.key_id)
            pts = to_limbs((secrets.randbelow(pk.n) for _ in range(batch)), pk.plain_width)
            backend.encrypt(pk, pts.slice(0, min(batch, 4 * workers)))  # warm the pool processes
            await he.encrypt(pk, pts.slice(0, min(batch, 4 * workers)))
            t0 = time.perf_counter()
            cts = backend.encrypt(pk, pts)
            t1 = time.perf_counter()
            await he.encrypt(pk, pts)
            t2 = time.perf_counter()
            out.append(("encrypt", t1 - t0, t2 - t1))
            t0 = time.perf_counter()
            backend.decrypt(sk, cts)
            t1 = time.perf_counter()
            await he.decrypt(pk, cts)
            t2 = time.perf_counter()
            out.append(("decrypt", t1 - t0, t2 - t1))
            t0 = time.perf_counter()
            backend.add(pk, cts, cts)
            t1 = time.perf_counter()
            await he.add(pk, cts, cts)
            t2 = time.perf_counter()
            out.append(("add", t1 - t0, t2 - t1))
    finally:
        await server.stop(0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedgate bench he", description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[1024, 2048], help="key sizes")
    parser.add_argument("--seconds", type=float, default=1.0, help="shortest timed run per figure")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the all-cores rows")
    parser.add_argument("--service-batch", type=int, default=10_000, help="batch size for the service rows")
    parser.add_argument("--no-service", action="store_true", help="skip the gRPC service rows")
    args = parser.parse_args(argv)
    print(f"fedgate bench he: {os.cpu_count()} cores, fresh randomness for every encryption")
    for bits in args.bits:
        pk, sk = generate_keypair(bits)
        rows = _fate_rows(bits, args.seconds) + _phe_rows(bits, args.seconds)
        rows += _fedgate_rows(bits, pk, sk, args.seconds, args.workers)
        base = {op: kops for op, impl, kops in rows if impl == "fate_utils"}
        print(f"\n[{bits}-bit keys] {'op':<11} {'implementation':<46} {'kops':>10} {'x fate_utils':>13}")
        for op in ("encrypt", "decrypt", "add", "mul 64-bit", "-"):
            for row_op, impl, kops in rows:
                if row_op != op:
                    continue
                ratio = f"{kops / base[op]:.2f}" if base.get(op) else "-"
                print(f"[{bits}-bit keys] {op:<11} {impl:<46} {kops:>10.3f} {ratio:>13}")
        if not args.no_service:
            batch = args.service_batch if bits <= 1024 else max(1, args.service_batch // 4)
            print(f"[{bits}-bit keys] service overhead, one batch of {batch}, cpu backend x {args.workers} processes:")
            for op, local, remote in asyncio.run(_service_overhead(bits, batch, args.workers)):
                print(
                    f"[{bits}-bit keys]   {op:<8} in-process {local:8.3f} s  via gRPC {remote:8.3f} s  "
                    f"overhead {100 * (remote / local - 1):+6.1f} %"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
