"""Package shape: the exported names stay in sync, and the pure cores import no I/O modules."""

from __future__ import annotations

import ast
import pathlib

import fedgate.audit

K_PACKAGE = pathlib.Path(fedgate.audit.__file__).parent
K_CORES = (
    "events",
    "pickle_scan",
    "safetensors_scan",
    "payload",
    "policy",
    "filters",
    "chain",
    "ledger_core",
)
K_FORBIDDEN = {"asyncio", "socket", "time", "grpc", "threading", "sqlite3", "pickle", "subprocess", "os"}


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_cores_are_pure() -> None:
    for name in K_CORES:
        bad = _imports(K_PACKAGE / f"{name}.py") & K_FORBIDDEN
        assert not bad, f"fedgate/audit/{name}.py imports {sorted(bad)}"


def test_all_is_in_sync() -> None:
    exported = set(fedgate.audit.__all__)
    assert exported == {n for n in dir(fedgate.audit) if not n.startswith("_")} - {
        # submodules are attributes of the package too
        p.stem
        for p in K_PACKAGE.glob("*.py")
    }
    for name in exported:
        assert getattr(fedgate.audit, name) is not None


def test_module_sizes() -> None:
    for path in K_PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 650, path.name
