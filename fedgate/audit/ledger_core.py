"""The ledger's pure core: records, the hash chain, signed checkpoints and verification.

Each entry's hash is ``SHA-256(canonical(seq, prev_hash, record))``; ``prev_hash`` is the previous
entry's hash (64 zeros before the first). Editing, deleting or reordering any entry breaks the chain
at that entry. A writer with database access could rewrite the whole chain after an edit, so every
``checkpoint_every`` entries (and on close) the chain head ``(seq, hash, ts)`` is signed with the
gateway's Ed25519 key; a rewritten chain no longer matches the signed heads, and entries cut off the
end show up as a checkpoint beyond the last entry. (Entries appended after the last checkpoint and
then removed cannot be told from entries never written: the checkpoint interval bounds that loss.)

Rules of this module:

1. Pure: no I/O, no clock; ``now`` is passed in; hashing and signing are functions of their inputs.
2. The canonical encoding is JSON with sorted keys, no whitespace, ASCII only; it never changes
   within a ledger version (``K_VERSION`` is hashed into every entry).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedgate.proxy.envelope import Envelope

__all__ = [
    "K_GENESIS",
    "Checkpoint",
    "HashChain",
    "LedgerEntry",
    "LedgerRecord",
    "VerifyReport",
    "entry_hash",
    "public_key_hex",
    "record_for",
    "sign_checkpoint",
    "verify_chain",
]

K_VERSION = 1
K_GENESIS = "0" * 64
K_CHECKPOINT_CONTEXT = b"fedgate-ledger-checkpoint-v1\x00"


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One audited message, as the ledger keeps it (never the payload itself)."""

    ts: float
    """Wall-clock seconds when it was audited."""
    direction: str
    """``out`` (from a local FATE worker, at the front) or ``in`` (from a peer, at the link)."""
    src_party: str
    dst_party: str
    session_id: str
    topic: str
    message_id: str
    size: int
    """Payload bytes."""
    sha256: str
    """Hex SHA-256 of the payload."""
    verdict: str
    """``accept``, ``reject`` or ``shadow-reject``."""
    rule: str
    """The audit rule that rejected it (empty when accepted)."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    seq: int
    """1, 2, 3, ... without gaps."""
    record: LedgerRecord
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed chain head."""

    seq: int
    hash: str
    ts: float
    signature: str
    """Hex Ed25519 signature over ``K_CHECKPOINT_CONTEXT + canonical(seq, hash, ts)``."""
    public_key: str
    """Hex raw Ed25519 public key of the signer (informational; verify against a trusted key)."""


def record_for(
    envelope: Envelope, direction: str, verdict: str, rule: str, *, now: float, sha256: str | None = None
) -> LedgerRecord:
    """The ledger record of one envelope (hashes the payload unless ``sha256`` is given)."""
    return LedgerRecord(
        ts=now,
        direction=direction,
        src_party=envelope.src_party,
        dst_party=envelope.dst_party,
        session_id=envelope.session_id,
        topic=envelope.topic,
        message_id=envelope.message_id,
        size=envelope.size,
        sha256=hashlib.sha256(envelope.payload).hexdigest() if sha256 is None else sha256,
        verdict=verdict,
        rule=rule,
    )


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


_RECORD_FIELDS = tuple(sorted(f.name for f in fields(LedgerRecord)))
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode  # keys are pre-sorted below


def entry_hash(seq: int, prev_hash: str, record: LedgerRecord) -> str:
    """SHA-256 of ``canonical([K_VERSION, seq, prev_hash, asdict(record)])``: the record's fields are read
    in sorted order (the same bytes as ``sort_keys``, without ``asdict``'s deep copy)."""
    fields_ = {name: getattr(record, name) for name in _RECORD_FIELDS}
    return hashlib.sha256(_ENCODE([K_VERSION, seq, prev_hash, fields_]).encode()).hexdigest()


def _checkpoint_message(seq: int, head: str, ts: float) -> bytes:
    return K_CHECKPOINT_CONTEXT + _canonical([K_VERSION, seq, head, ts])


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign_checkpoint(key: Ed25519PrivateKey, seq: int, head: str, *, now: float) -> Checkpoint:
    signature = key.sign(_checkpoint_message(seq, head, now)).hex()
    return Checkpoint(seq, head, now, signature, public_key_hex(key.public_key()))


class HashChain:
    """The running head of the chain; ``append`` turns records into entries."""

    def __init__(self, *, seq: int = 0, head: str = K_GENESIS) -> None:
        self.seq = seq
        self.head = head

    def append(self, record: LedgerRecord) -> LedgerEntry:
        seq = self.seq + 1
        digest = entry_hash(seq, self.head, record)
        entry = LedgerEntry(seq, record, self.head, digest)
        self.seq, self.head = seq, digest
        return entry


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    entries: int
    """Entries checked."""
    checkpoints: int
    """Checkpoints whose signature and position were checked."""
    first_bad_seq: int | None
    """The first entry (seq) that is wrong or missing; None when all is well."""
    reason: str


def verify_chain(
    entries: Iterable[LedgerEntry], checkpoints: Sequence[Checkpoint], public_key: Ed25519PublicKey
) -> VerifyReport:
    """Check the chain from the first entry and every checkpoint against it; name the first bad entry."""
    by_seq = {cp.seq: cp for cp in checkpoints}
    for cp in checkpoints:
        try:
            public_key.verify(bytes.fromhex(cp.signature), _checkpoint_message(cp.seq, cp.hash, cp.ts))
        except (InvalidSignature, ValueError):
            return VerifyReport(False, 0, 0, cp.seq, f"checkpoint at seq {cp.seq} has a bad signature")
    chain = HashChain()
    checked_cps = 0
    count = 0
    for entry in entries:
        expected = chain.seq + 1
        if entry.seq != expected:
            what = "missing (deleted)" if entry.seq > expected else "out of order"
            return VerifyReport(False, count, checked_cps, expected, f"entry {expected} is {what}")
        if entry.prev_hash != chain.head:
            return VerifyReport(
                False, count, checked_cps, entry.seq, f"entry {entry.seq} does not link to entry {expected - 1}"
            )
        if entry_hash(entry.seq, chain.head, entry.record) != entry.hash:
            return VerifyReport(False, count, checked_cps, entry.seq, f"entry {entry.seq} was edited (hash mismatch)")
        chain.append(entry.record)
        count += 1
        signed = by_seq.get(entry.seq)
        if signed is not None:
            if signed.hash != chain.head:
                return VerifyReport(
                    False,
                    count,
                    checked_cps,
                    entry.seq,
                    f"chain up to entry {entry.seq} differs from its signed checkpoint",
                )
            checked_cps += 1
    beyond = [cp.seq for cp in checkpoints if cp.seq > chain.seq]
    if beyond:
        return VerifyReport(
            False,
            count,
            checked_cps,
            chain.seq + 1,
            f"entries {chain.seq + 1}..{max(beyond)} were deleted (signed checkpoint at {max(beyond)})",
        )
    return VerifyReport(True, count, checked_cps, None, "ok")
