"""Shared fixtures: key pairs are generated once per session (1024-bit mostly, one 2048-bit pair)."""

from __future__ import annotations

import pytest

from fedgate.compute.paillier import PublicKey, SecretKey, generate_keypair

KeyPair = tuple[PublicKey, SecretKey]


@pytest.fixture(scope="session")
def keys1024() -> KeyPair:
    return generate_keypair(1024)


@pytest.fixture(scope="session")
def keys2048() -> KeyPair:
    return generate_keypair(2048)
