"""fedgate.audit: the inline audit filter and the tamper-evident ledger.

What the integrator calls (see README.md in this package for the full picture)::

    chain = AuditChain.from_config(config.audit, registry=metrics_registry)     # once, at start-up
    ledger = LedgerWriter.from_config(config.audit)                              # once; run ledger.run()
    result = chain.inspect(envelope, "out", now=time.time())                     # per message
    ledger.record(envelope, "out", *result.ledger_verdict, now=time.time())
    if isinstance(result.verdict, Reject): raise RejectedError(result.verdict.rule, result.verdict.detail)
"""

from fedgate.audit.chain import AuditChain, AuditResult, build_filters
from fedgate.audit.config import AuditConfig
from fedgate.audit.events import (
    ColumnStats,
    EncryptedTensorFound,
    Event,
    GlobalImported,
    KeyFound,
    Malformed,
    ScanLimit,
    TensorFound,
)
from fedgate.audit.filters import K_FILTERS, AuditContext, AuditFilter, Continue, Direction, Reject, Verdict
from fedgate.audit.ledger_core import Checkpoint, HashChain, LedgerEntry, LedgerRecord, VerifyReport, verify_chain
from fedgate.audit.ledger_store import LedgerStore
from fedgate.audit.ledger_writer import LedgerWriter
from fedgate.audit.payload import Inspection, PayloadInspector, PayloadLimits
from fedgate.audit.pickle_scan import PickleLimits, PickleWalker
from fedgate.audit.policy import AuditPolicy, load_policy
from fedgate.audit.safetensors_scan import SafetensorsScanner

__all__ = [
    "K_FILTERS",
    "AuditChain",
    "AuditConfig",
    "AuditContext",
    "AuditFilter",
    "AuditPolicy",
    "AuditResult",
    "Checkpoint",
    "ColumnStats",
    "Continue",
    "Direction",
    "EncryptedTensorFound",
    "Event",
    "GlobalImported",
    "HashChain",
    "Inspection",
    "KeyFound",
    "LedgerEntry",
    "LedgerRecord",
    "LedgerStore",
    "LedgerWriter",
    "Malformed",
    "PayloadInspector",
    "PayloadLimits",
    "PickleLimits",
    "PickleWalker",
    "Reject",
    "SafetensorsScanner",
    "ScanLimit",
    "TensorFound",
    "Verdict",
    "VerifyReport",
    "build_filters",
    "load_policy",
    "verify_chain",
]
