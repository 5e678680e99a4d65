"""The audit chain: payload inspection once, then the filters in order (FIFO), enforce or shadow.

Envoy's RBAC filter is the model (``rbac/config.cc``, ``rbac_filter.h``): the configuration is
validated once and the chain built from it is immutable; in *shadow* mode every filter still runs
and every would-be rejection is counted and returned as :class:`~fedgate.audit.filters.Continue`
(with the rejection kept in :attr:`AuditResult.shadow`), so a policy can be tried on live traffic.

Rules of this module:

1. Sans-IO: :meth:`AuditChain.inspect` takes the envelope, the direction and keyword-only ``now``
   (wall-clock seconds); it never blocks. Metrics go to the ``prometheus_client`` registry passed
   in (never the global one); pass None for no metrics.
2. A FATE object that was rejected once stays rejected: later pieces of it (split slices, rollsite
   chunks, its split header) are rejected with rule ``object.rejected``. The memory of rejected
   objects is bounded (``K_MAX_REJECTED`` objects, oldest forgotten first).
3. An exception inside a filter is a bug of ours: it propagates (the front answers INTERNAL);
   the chain does not swallow it into a verdict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from fedgate.audit.config import AuditConfig
from fedgate.audit.filters import (
    CONTINUE,
    K_FILTERS,
    AuditContext,
    AuditFilter,
    Direction,
    Reject,
    Verdict,
)
from fedgate.audit.payload import Inspection, PayloadInspector, PayloadLimits
from fedgate.audit.pickle_scan import PickleLimits
from fedgate.audit.policy import AuditPolicy, PolicyCache, load_policy
from fedgate.audit.safetensors_scan import numpy_available
from fedgate.errors import ConfigError, UnknownPluginError
from fedgate.proxy.envelope import Envelope

__all__ = ["AuditChain", "AuditResult", "build_filters"]

K_MAX_REJECTED = 4096  # rejected FATE objects remembered


@dataclass(frozen=True, slots=True)
class AuditResult:
    """The chain's answer for one message."""

    verdict: Verdict
    """What to do: Continue or Reject (never Reject in shadow mode)."""
    shadow: Reject | None
    """In shadow mode, the rejection that enforce mode would have returned."""
    inspection: Inspection | None
    """What the payload inspector found (None when auditing is disabled)."""

    @property
    def ledger_verdict(self) -> tuple[str, str]:
        """(verdict, rule) as the ledger records them: ``accept``, ``reject`` or ``shadow-reject``."""
        if isinstance(self.verdict, Reject):
            return "reject", self.verdict.rule
        if self.shadow is not None:
            return "shadow-reject", self.shadow.rule
        return "accept", ""


def build_filters(names: Sequence[str], policy: AuditPolicy) -> tuple[AuditFilter, ...]:
    """Instantiate the named filters in order; an unknown name lists the valid ones."""
    filters = []
    for name in names:
        factory = K_FILTERS.get(name)
        if factory is None:
            raise UnknownPluginError("audit filter", name, list(K_FILTERS), path="audit.filters")
        filters.append(factory(policy))
    return tuple(filters)


class AuditChain:
    """Inspect every message; one instance per gateway serves both directions."""

    def __init__(
        self,
        config: AuditConfig,
        policy: AuditPolicy,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if config.enabled and not numpy_available():
            raise ConfigError("the audit chain needs numpy (pip install 'numpy>=1.26')", path="audit.enabled")
        self._config = config
        self._policy = policy
        self._rules = PolicyCache(policy)  # rule lookups memoized per (session, src, dst, message name)
        self._filters = build_filters(config.filters, policy)
        limits = PayloadLimits(
            max_pending_bytes=config.max_pending_bytes,
            max_objects=config.max_open_objects,
            idle_timeout_s=config.object_idle_timeout_s,
            pickle=PickleLimits(max_memo=config.max_pickle_memo, max_stack=config.max_pickle_stack),
        )
        # one inspector per direction: a message is inspected at both ends, never twice at one
        self._inspectors = {"in": PayloadInspector(limits=limits), "out": PayloadInspector(limits=limits)}
        self._rejected: OrderedDict[tuple[str, ...], str] = OrderedDict()
        # per-message counts are plain ints (no lock per increment); _Counts exposes them at scrape time
        self._counts: _Counts | None = None
        if registry is not None:
            self._counts = _Counts()
            registry.register(self._counts)

    @classmethod
    def from_config(cls, config: AuditConfig, *, registry: CollectorRegistry | None = None) -> AuditChain:
        """Load the policy file named by the config (built-in defaults when none) and build the chain."""
        policy = load_policy(config.policy_file) if config.policy_file is not None else AuditPolicy()
        return cls(config, policy, registry=registry)

    @property
    def policy(self) -> AuditPolicy:
        return self._policy

    @property
    def filter_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self._filters)

    def inspect(self, envelope: Envelope, direction: Direction, *, now: float) -> AuditResult:
        """Run the chain on one message."""
        if not self._config.enabled:
            return AuditResult(CONTINUE, None, None)
        inspection = self._inspectors[direction].inspect(envelope, now=now)
        rule = self._rules.rule_for(
            session=envelope.session_id, src=envelope.src_party, dst=envelope.dst_party, message=inspection.name
        )
        ctx = AuditContext(envelope, direction, rule, inspection)
        rejects: list[Reject] = []
        earlier = self._rejected.get(inspection.object_key)
        if earlier is not None and inspection.form != "inline":
            rejects.append(Reject("object.rejected", f"object {inspection.name!r} was rejected by {earlier}"))
        for flt in self._filters:
            if rejects and not self._config.shadow:
                break
            verdict = flt.inspect(ctx, now=now)
            if isinstance(verdict, Reject):
                rejects.append(verdict)
        result = self._result(rejects, inspection)
        if rejects and inspection.form in ("split_slice", "split_header", "chunk"):
            self._remember(inspection.object_key, rejects[0].rule)
        self._count(direction, envelope.size, result, rejects)
        return result

    def _result(self, rejects: list[Reject], inspection: Inspection) -> AuditResult:
        if not rejects:
            return AuditResult(CONTINUE, None, inspection)
        if self._config.shadow:
            return AuditResult(CONTINUE, rejects[0], inspection)
        return AuditResult(rejects[0], None, inspection)

    def _remember(self, key: tuple[str, ...], rule: str) -> None:
        self._rejected[key] = rule
        self._rejected.move_to_end(key)
        while len(self._rejected) > K_MAX_REJECTED:
            self._rejected.popitem(last=False)

    def _count(self, direction: str, size: int, result: AuditResult, rejects: list[Reject]) -> None:
        counts = self._counts
        if counts is None:
            return
        key = (direction, result.ledger_verdict[0])
        messages = counts.messages
        messages[key] = messages.get(key, 0) + 1
        counts.bytes[direction] = counts.bytes.get(direction, 0) + size
        if rejects:
            mode = "shadow" if self._config.shadow else "enforce"
            for reject in rejects:
                rkey = (direction, reject.rule, mode)
                counts.rejects[rkey] = counts.rejects.get(rkey, 0) + 1


class _Counts(Collector):
    """The chain's Prometheus counters, counted in plain dicts by the event loop and read at scrape time
    (a dict copy is atomic under the GIL): ``fedgate_audit_messages_total{direction,verdict}``,
    ``fedgate_audit_rejections_total{direction,rule,mode}`` (mode=shadow: counted, not enforced),
    ``fedgate_audit_inspected_bytes_total{direction}``."""

    def __init__(self) -> None:
        self.messages: dict[tuple[str, str], int] = {}
        self.rejects: dict[tuple[str, str, str], int] = {}
        self.bytes: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily("fedgate_audit_messages", "Messages audited", labels=["direction", "verdict"])
        for labels, value in self.messages.copy().items():
            messages.add_metric(list(labels), value)
        rejects = CounterMetricFamily("fedgate_audit_rejections",
                                      "Rejections by rule (mode=shadow: counted, not enforced)",
                                      labels=["direction", "rule", "mode"])
        for rlabels, value in self.rejects.copy().items():
            rejects.add_metric(list(rlabels), value)
        inspected = CounterMetricFamily("fedgate_audit_inspected_bytes", "Payload bytes audited", labels=["direction"])
        for direction, value in self.bytes.copy().items():
            inspected.add_metric([direction], value)
        return iter((messages, rejects, inspected))
