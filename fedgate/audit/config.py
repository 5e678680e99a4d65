"""The ``[audit]`` configuration section (owned by the audit package).

Relative paths are relative to the process's working directory (systemd sets it to the state
directory), like the rest of the configuration tree.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Literal

from fedgate.configtree import bounds

__all__ = ["AuditConfig"]

K_DEFAULT_FILTER_ORDER = ("size", "rate", "control", "pickle", "keys", "tensors")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Inline audit filter and ledger settings."""

    enabled: bool = True
    """Run the filter chain on every message."""
    shadow: bool = False
    """Shadow mode: run every filter, count and record would-be rejections, reject nothing."""
    policy_file: pathlib.Path | None = None
    """Audit policy (TOML, see ``fedgate/audit/policy.example.toml``); unset: built-in defaults."""
    filters: tuple[str, ...] = field(default=K_DEFAULT_FILTER_ORDER, metadata=bounds(nonempty=True))
    """Filters run on each message, in this order (``size rate control pickle keys tensors``)."""
    max_pending_bytes: int = field(default=256 * 1024 * 1024, metadata=bounds(ge=0))
    """Out-of-order split-slice / chunk bytes buffered for inspection, over all objects, in bytes."""
    max_open_objects: int = field(default=1024, metadata=bounds(ge=1))
    """Split or chunked FATE objects being reassembled for inspection at once, per direction."""
    object_idle_timeout_s: float = field(default=600.0, metadata=bounds(gt=0))
    """Seconds after which an unfinished split object is forgotten (and its next piece rejected)."""
    max_pickle_memo: int = field(default=100_000, metadata=bounds(ge=16))
    """Memo entries one pickle may create before it is rejected as too complex."""
    max_pickle_stack: int = field(default=100_000, metadata=bounds(ge=16))
    """Symbolic stack depth one pickle may reach before it is rejected as too complex."""
    ledger: bool = True
    """Record every message in the tamper-evident ledger."""
    ledger_path: pathlib.Path = pathlib.Path("var/ledger.db")
    """Ledger database (SQLite, WAL), its own file next to the store; its directory is created."""
    signing_key: pathlib.Path = pathlib.Path("var/ledger-signing.key")
    """The gateway's Ed25519 private key (PKCS#8 PEM) that signs ledger checkpoints."""
    create_signing_key: bool = True
    """Generate ``signing_key`` (mode 0600) when it does not exist; otherwise a missing key is an error."""
    checkpoint_every: int = field(default=1000, metadata=bounds(ge=1))
    """Entries between signed checkpoints."""
    checkpoint_interval_s: float = field(default=60.0, metadata=bounds(gt=0))
    """Seconds between signed checkpoints when fewer entries arrived (none when nothing arrived)."""
    ledger_queue: int = field(default=65536, metadata=bounds(ge=1))
    """Records waiting for the ledger writer; beyond it appends wait (or fail when non-blocking)."""
    ledger_batch: int = field(default=512, metadata=bounds(ge=1))
    """Most records written in one SQLite transaction."""
    ledger_commit_interval_s: float = field(default=0.05, metadata=bounds(ge=0, le=10))
    """Seconds the ledger writer waits after a record for more to share its transaction."""
    ledger_ack_after_commit: bool = False
    """Acknowledge a message (answer the push, ack the link frames) only once its ledger record is
    committed (group commit). Off (the default): the record is queued in memory before the message is
    stored or forwarded and committed within ``ledger_commit_interval_s``; a clean stop writes every
    queued record, but a crash (kill -9, power loss) can lose the records of the messages handled in
    that last interval (``fedgate audit reconcile`` then lists them as never recorded on this side).
    On costs about one SQLite transaction per acknowledged message at low concurrency
    (``fedgate bench audit --modes off,acked``)."""
    ledger_synchronous: Literal["full", "normal"] = "normal"
    """SQLite ``synchronous`` level of the ledger; ``full`` survives power loss."""
