"""The tree is the architecture: the pure cores import no I/O (each package also checks its own)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fedgate"
K_IO = {"asyncio", "grpc", "socket", "time", "ssl", "sqlite3", "pyverbs", "threading", "subprocess", "uvloop"}
PURE = [
    "configtree.py",
    "errors.py",
    "proxy/envelope.py",
    "proxy/routing.py",
    "proxy/store_api.py",
    "proxy/link_frames.py",
    "proxy/link_core.py",
    "proxy/link_send.py",
    "proxy/link_recv.py",
    "proxy/link_events.py",
]


def imported(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_core_imports_no_io(module: str) -> None:
    assert not imported(ROOT / module) & K_IO, f"{module} is a pure core: no I/O, no clock"


def test_every_package_with_more_than_five_modules_has_a_readme() -> None:
    for package in [p for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()]:
        if len(list(package.glob("*.py"))) > 5:
            readme = package / "README.md"
            assert readme.exists(), f"{package.name} needs a README (STRUCTURE / WHERE TO LOOK / ANTI-PATTERNS)"
            text = readme.read_text()
            for section in ("STRUCTURE", "WHERE TO LOOK", "ANTI-PATTERNS"):
                assert section in text.upper(), f"{readme}: no {section} section"
