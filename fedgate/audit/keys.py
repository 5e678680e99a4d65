"""Loading (and first-time creation) of the gateway's Ed25519 ledger signing key.

Rules of this module:

1. File I/O only; keys are PKCS#8 PEM (private) or SubjectPublicKeyInfo PEM (public), unencrypted,
   created with mode 0600 in a directory created if missing.
2. Every problem is a :class:`~fedgate.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import os
import pathlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from fedgate.errors import ConfigError

__all__ = ["load_public_key", "load_signing_key"]


def load_signing_key(path: pathlib.Path | str, *, create: bool = False) -> Ed25519PrivateKey:
    """The Ed25519 private key at ``path``; generated there first when missing and ``create``."""
    path = pathlib.Path(path)
    if not path.exists() and create:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return key
    try:
        key_obj = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError("signing key not found", source=str(path)) from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not an unencrypted PEM private key: {exc}", source=str(path)) from exc
    if not isinstance(key_obj, Ed25519PrivateKey):
        raise ConfigError(f"expected an Ed25519 key, got {type(key_obj).__name__}", source=str(path))
    return key_obj


def load_public_key(path: pathlib.Path | str) -> Ed25519PublicKey:
    """An Ed25519 public key from a public-key PEM, or derived from a private-key PEM."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key: {exc.strerror}", source=str(path)) from exc
    if b"PRIVATE KEY" in data:
        return load_signing_key(path).public_key()
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"not a PEM public key: {exc}", source=str(path)) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"expected an Ed25519 key, got {type(key).__name__}", source=str(path))
    return key
