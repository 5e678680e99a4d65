"""Keys the offload service holds, by id.

Rules of this module:

1. A key id is the public key's fingerprint (:attr:`PublicKey.key_id`); registering the same modulus
   twice gives the same id.
2. Secret keys enter (generated here, or imported by the gateway's own process) and never leave: no
   method returns one to a caller outside this package, and :class:`KeyEntry`'s ``repr`` hides it.
3. A secret key is used and dropped only with its token: 32 random bytes handed to whoever generated or
   imported it (a capability; importing the same secret again returns the same token, since the
   importer holds the secret anyway). Any local process can reach the service, so a key id alone, which
   every party that saw the public key can compute, must not be enough to decrypt. Public operations
   (encrypt, add, multiply) need no token: their results are ciphertexts.
4. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

from fedgate.compute.paillier import PublicKey, SecretKey, generate_keypair
from fedgate.errors import InvalidRequestError, StoreFullError

__all__ = ["K_TOKEN_BYTES", "KeyEntry", "KeyStore", "KeyTokenError", "NoSecretKeyError", "UnknownKeyError"]

K_TOKEN_BYTES = 32  # bytes of a secret key's token


class UnknownKeyError(InvalidRequestError):
    """No key with this id is registered."""

    grpc_status = "NOT_FOUND"


class NoSecretKeyError(InvalidRequestError):
    """The operation needs a secret key this gateway does not hold."""

    grpc_status = "FAILED_PRECONDITION"


class KeyTokenError(InvalidRequestError):
    """A secret-key operation without the token of that key (rule 3)."""

    grpc_status = "PERMISSION_DENIED"


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One registered key."""

    public: PublicKey
    """The public key."""
    secret: SecretKey | None = field(default=None, repr=False)
    """The secret key, when this gateway owns it (never serialized, never printed)."""
    token: bytes = field(default=b"", repr=False)
    """The secret key's token (rule 3); empty for a public key alone."""


class KeyStore:
    """At most ``max_keys`` keys, by id."""

    def __init__(self, *, max_keys: int) -> None:
        self._max = max_keys
        self._keys: dict[str, KeyEntry] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def _put(self, entry: KeyEntry) -> KeyEntry:
        key_id = entry.public.key_id
        old = self._keys.get(key_id)
        if old is None and len(self._keys) >= self._max:
            raise StoreFullError(f"the HE service already holds {self._max} keys; drop one first")
        if old is not None and old.secret is not None:
            return old  # the secret (and its token) stays; the same modulus means the same secret
        self._keys[key_id] = entry
        return entry

    def generate(self, bits: int) -> KeyEntry:
        """Generate a key pair here; the entry's public key and token go to the caller, never its secret."""
        pk, sk = generate_keypair(bits)
        return self._put(KeyEntry(pk, sk, secrets.token_bytes(K_TOKEN_BYTES)))

    def add_public(self, pk: PublicKey) -> str:
        """Register a public key (for encryption and evaluation); returns its id."""
        return self._put(KeyEntry(pk)).public.key_id

    def add_secret(self, sk: SecretKey) -> KeyEntry:
        """Import a secret key into this gateway; its entry carries the token (rule 3)."""
        return self._put(KeyEntry(sk.public, sk, secrets.token_bytes(K_TOKEN_BYTES)))

    def public(self, key_id: str) -> PublicKey:
        """The public key ``key_id``."""
        return self.entry(key_id).public

    def entry(self, key_id: str) -> KeyEntry:
        """The entry ``key_id`` (for the service's own use)."""
        entry = self._keys.get(key_id)
        if entry is None:
            raise UnknownKeyError(f"unknown key id {key_id!r}")
        return entry

    def secret(self, key_id: str, token: bytes) -> SecretKey:
        """The secret key ``key_id``, for the holder of its token (for the service's own use; never sent)."""
        entry = self.entry(key_id)
        if entry.secret is None:
            raise NoSecretKeyError(f"this gateway holds no secret key for {key_id!r}")
        _check_token(entry, token)
        return entry.secret

    def drop(self, key_id: str, token: bytes = b"") -> bool:
        """Forget a key; True if it was there. A secret key needs its token."""
        entry = self._keys.get(key_id)
        if entry is None:
            return False
        if entry.secret is not None:
            _check_token(entry, token)
        del self._keys[key_id]
        return True

    def ids(self) -> list[str]:
        """Registered key ids."""
        return sorted(self._keys)


def _check_token(entry: KeyEntry, token: bytes) -> None:
    if not hmac.compare_digest(entry.token, token):
        what = "no secret_token" if not token else "a wrong secret_token"
        raise KeyTokenError(
            f"{what} for the secret key {entry.public.key_id!r}: only the client that generated or imported "
            "it holds its token (HeClient.secret_token hands it to another process)"
        )
