"""Package rules: exported names in sync, pure cores free of I/O imports, heavy modules not preloaded."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import fedgate.compute as compute

PKG = pathlib.Path(compute.__file__).parent
# pure cores: no asyncio / grpc / socket / time / subprocess / threading, no device libraries
K_PURE = ("paillier.py", "djn.py", "encoding.py", "limbs.py", "keystore.py", "fate.py", "testing.py", "api.py")
K_FORBIDDEN = {"asyncio", "grpc", "socket", "time", "subprocess", "threading", "cupy", "ctypes", "pyxrt"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_all_is_in_sync() -> None:
    exported = {name for name in dir(compute) if not name.startswith("_")}
    modules = {p.stem for p in PKG.glob("*.py")} | {"kernels", "annotations"}
    assert set(compute.__all__) == exported - modules
    for name in compute.__all__:
        assert getattr(compute, name) is not None


def test_pure_cores_do_no_io() -> None:
    for name in K_PURE:
        bad = _imports(PKG / name) & K_FORBIDDEN
        assert not bad, f"{name} imports {sorted(bad)}"


def test_heavy_modules_are_not_imported_by_the_package() -> None:
    code = (
        "import sys, fedgate.compute, fedgate.config; "
        "print(sorted(m for m in sys.modules if m in "
        "('cupy', 'grpc', 'fedgate.compute.gpu', 'fedgate.compute.fpga', 'fedgate.compute.ifma', 'numpy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "cupy" not in out and "fedgate.compute.gpu" not in out and "fedgate.compute.fpga" not in out


def test_kernel_source_ships_with_the_package() -> None:
    kernels = PKG / "kernels"
    assert (kernels / "montgomery.h").is_file() and (kernels / "paillier.cu").is_file()
    assert '#include "montgomery.h"' in (kernels / "paillier.cu").read_text()
