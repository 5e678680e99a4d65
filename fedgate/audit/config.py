"""The ``[audit]`` configuration section (owned by the audit package)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AuditConfig"]


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Inline audit filter and ledger settings."""

    enabled: bool = True
    """Run the filter chain on every message."""
