"""Build ``kernels/montgomery.h`` as a plain C shared library and run it through ctypes.

This is the GPU backend's arithmetic on the host: :class:`CDevice` implements
:class:`~fedgate.compute.gpu.KernelDevice`, so ``GpuBackend(config, CDevice(dir))`` runs the exact
kernel source and host logic of the gpu backend on a CPU. CI uses it to check the kernels against
gmpy2 and to run the conformance suite; it is not meant to be fast (plain C, one core).

Rules: the compiler is found on PATH (``cc``, ``gcc`` or ``clang``); a missing compiler raises
:class:`~fedgate.errors.LocalError` naming what is missing; libraries are built into a directory the
caller owns (a pytest ``tmp_path``), never next to the sources.
"""

from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedgate.compute.gpu import U32, kernel_source
from fedgate.errors import LocalError

__all__ = ["CDevice", "build_library", "find_compiler"]


def find_compiler() -> str | None:
    """The first C compiler on PATH, or None."""
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def build_library(out_dir: pathlib.Path, *, max_limbs: int) -> pathlib.Path:
    """Compile montgomery.h with ``cc -O2 -shared -fPIC`` into ``out_dir``; returns the .so path."""
    compiler = find_compiler()
    if compiler is None:
        raise LocalError("no C compiler (cc, gcc or clang) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "fg_montgomery.c"
    src.write_text(kernel_source(), encoding="utf-8")
    lib = out_dir / f"libfg_montgomery_{max_limbs}.so"
    cmd = [compiler, "-O2", "-shared", "-fPIC", "-std=c99", f"-DFG_MAX_LIMBS={max_limbs}", "-o", str(lib), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LocalError(f"compiling the HE kernels as C failed: {proc.stderr.strip()[:2000]}")
    return lib


class CDevice:
    """montgomery.h compiled as C, called through ctypes (one library per FG_MAX_LIMBS)."""

    def __init__(self, build_dir: pathlib.Path) -> None:
        self._dir = build_dir
        self._libs: dict[int, ctypes.CDLL] = {}

    @property
    def name(self) -> str:
        return "montgomery.h as C (host)"

    def _lib(self, max_limbs: int) -> ctypes.CDLL:
        lib = self._libs.get(max_limbs)
        if lib is None:
            lib = self._libs[max_limbs] = ctypes.CDLL(str(build_library(self._dir, max_limbs=max_limbs)))
        return lib

    def upload(self, arr: U32) -> Any:
        return np.ascontiguousarray(arr, dtype=np.uint32)

    def run(self, kernel: str, count: int, out_shape: tuple[int, int], args: Sequence[Any], *, max_limbs: int) -> U32:
        out = np.zeros(out_shape, dtype=np.uint32)
        if not count:
            return out
        keep = [out]
        cargs: list[Any] = [out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))]
        for a in args:
            if isinstance(a, np.ndarray):
                arr = np.ascontiguousarray(a, dtype=np.uint32)
                keep.append(arr)
                cargs.append(arr.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)))
            else:
                cargs.append(ctypes.c_int(int(a)))
        getattr(self._lib(max_limbs), kernel)(*cargs)
        del keep
        return out
