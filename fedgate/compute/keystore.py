"""Keys the offload service holds, by id.

Rules of this module:

1. A key id is the public key's fingerprint (:attr:`PublicKey.key_id`); registering the same modulus
   twice gives the same id.
2. Secret keys enter (generated here, or imported by the gateway's own process) and never leave: no
   method returns one to a caller outside this package, and :class:`KeyEntry`'s ``repr`` hides it.
3. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedgate.compute.paillier import PublicKey, SecretKey, generate_keypair
from fedgate.errors import InvalidRequestError, StoreFullError

__all__ = ["KeyEntry", "KeyStore", "UnknownKeyError"]


class UnknownKeyError(InvalidRequestError):
    """No key with this id is registered."""

    grpc_status = "NOT_FOUND"


class NoSecretKeyError(InvalidRequestError):
    """The operation needs a secret key this gateway does not hold."""

    grpc_status = "FAILED_PRECONDITION"


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One registered key."""

    public: PublicKey
    """The public key."""
    secret: SecretKey | None = field(default=None, repr=False)
    """The secret key, when this gateway owns it (never serialized, never printed)."""


class KeyStore:
    """At most ``max_keys`` keys, by id."""

    def __init__(self, *, max_keys: int) -> None:
        self._max = max_keys
        self._keys: dict[str, KeyEntry] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def _put(self, entry: KeyEntry) -> KeyEntry:
        key_id = entry.public.key_id
        old = self._keys.get(key_id)
        if old is None and len(self._keys) >= self._max:
            raise StoreFullError(f"the HE service already holds {self._max} keys; drop one first")
        if old is not None and old.secret is not None and entry.secret is None:
            return old  # re-registering the public half keeps the secret
        self._keys[key_id] = entry
        return entry

    def generate(self, bits: int) -> PublicKey:
        """Generate a key pair here; only the public key is returned."""
        pk, sk = generate_keypair(bits)
        self._put(KeyEntry(pk, sk))
        return pk

    def add_public(self, pk: PublicKey) -> str:
        """Register a public key (for encryption and evaluation); returns its id."""
        return self._put(KeyEntry(pk)).public.key_id

    def add_secret(self, sk: SecretKey) -> str:
        """Import a secret key into this gateway; returns its id."""
        return self._put(KeyEntry(sk.public, sk)).public.key_id

    def public(self, key_id: str) -> PublicKey:
        """The public key ``key_id``."""
        return self.entry(key_id).public

    def entry(self, key_id: str) -> KeyEntry:
        """The entry ``key_id`` (for the service's own use)."""
        entry = self._keys.get(key_id)
        if entry is None:
            raise UnknownKeyError(f"unknown key id {key_id!r}")
        return entry

    def secret(self, key_id: str) -> SecretKey:
        """The secret key ``key_id`` (for the service's own use; never sent anywhere)."""
        secret = self.entry(key_id).secret
        if secret is None:
            raise NoSecretKeyError(f"this gateway holds no secret key for {key_id!r}")
        return secret

    def drop(self, key_id: str) -> bool:
        """Forget a key; True if it was there."""
        return self._keys.pop(key_id, None) is not None

    def ids(self) -> list[str]:
        """Registered key ids."""
        return sorted(self._keys)
