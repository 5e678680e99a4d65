"""Fixtures of the interop suite: client venv interpreters and the in-memory OSX broker."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.interop.harness import require_venv
from tests.interop.memory_broker import MemoryBroker


@pytest.fixture(scope="session")
def pyfate_python() -> pathlib.Path:
    """The pyfate venv's python (skip, or fail under CI, when it is not built)."""
    return require_venv("pyfate")


@pytest.fixture(scope="session")
def eggroll_python() -> pathlib.Path:
    """The eggroll venv's python (skip, or fail under CI, when it is not built)."""
    return require_venv("eggroll")


@pytest.fixture
def memory_broker() -> Iterator[MemoryBroker]:
    broker = MemoryBroker(port=0, max_pop_wait_s=60.0)
    try:
        yield broker
    finally:
        broker.close()
