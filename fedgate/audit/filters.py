"""Audit filters: one check each, judged against the policy, returning Continue or Reject.

Envoy's network-filter shape (``network/filter.h``): a filter sees one message and answers continue or
stop; the chain runs them in order. Here a filter gets an :class:`AuditContext` (the envelope, the
direction, the matched policy rule and what the payload inspector found) and returns a
:class:`Continue` or a :class:`Reject` naming the rule and the offending value.

Rules of this module:

1. Filters are pure functions of the context, except :class:`RateFilter`, whose token buckets take
   ``now`` and are bounded (least recently used buckets are forgotten beyond ``K_MAX_BUCKETS``).
2. Filters are built once from the policy and never reconfigured; a new policy means a new chain.
3. The registry :data:`K_FILTERS` is the one table of names; unknown names raise
   :class:`~fedgate.errors.UnknownPluginError` at chain construction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Protocol

from fedgate.audit.config import K_DEFAULT_FILTER_ORDER
from fedgate.audit.events import EncryptedTensorFound, GlobalImported, KeyFound, Malformed, ScanLimit, TensorFound
from fedgate.audit.payload import Inspection
from fedgate.audit.policy import AuditPolicy, MessageRule, PolicyCache
from fedgate.proxy.envelope import Envelope

__all__ = [
    "K_DEFAULT_FILTERS",
    "K_FILTERS",
    "AuditContext",
    "AuditFilter",
    "Continue",
    "Direction",
    "FilterFactory",
    "Reject",
    "Verdict",
]

K_MAX_BUCKETS = 65536  # rate-limit buckets remembered
_FRAMINGS = frozenset({"osx", "rollsite"})  # Malformed.where of a payload that is not FATE-framed at all

Direction = Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class Continue:
    """Let the message through."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Stop the message: ``rule`` names the check (``key.size``), ``detail`` the value that failed."""

    rule: str
    detail: str


Verdict = Continue | Reject
CONTINUE = Continue()


@dataclass(frozen=True, slots=True)
class AuditContext:
    """Everything a filter may look at for one message."""

    envelope: Envelope
    direction: Direction
    rule: MessageRule
    """The policy rule matched by party pair, session and message name."""
    inspection: Inspection


class AuditFilter(Protocol):
    """One check of the chain."""

    @property
    def name(self) -> str: ...

    def inspect(self, ctx: AuditContext, *, now: float) -> Verdict: ...


FilterFactory = Callable[[AuditPolicy], AuditFilter]


def _reject(ctx: AuditContext, rule: str, detail: str) -> Reject:
    return Reject(rule, f"{detail} (policy rule {ctx.rule.name!r}, message {ctx.inspection.name!r})")


class SizeFilter:
    """``max_message_bytes`` on the payload, ``max_object_bytes`` on the FATE object."""

    name = "size"

    def inspect(self, ctx: AuditContext, *, now: float) -> Verdict:
        limit = ctx.rule.max_message_bytes
        if limit and ctx.envelope.size > limit:
            return _reject(ctx, "size.message", f"message of {ctx.envelope.size} bytes > {limit}")
        limit, size = ctx.rule.max_object_bytes, ctx.inspection.object_size
        if limit and size is not None and size > limit:
            return _reject(ctx, "size.object", f"object of {size} bytes > {limit}")
        return CONTINUE


class RateFilter:
    """A token bucket per (rule, session, source, destination, direction)."""

    name = "rate"

    def __init__(self) -> None:
        self._buckets: OrderedDict[tuple[str, ...], tuple[float, float]] = OrderedDict()

    def inspect(self, ctx: AuditContext, *, now: float) -> Verdict:
        rate = ctx.rule.max_messages_per_s
        if not rate:
            return CONTINUE
        env = ctx.envelope
        key = (ctx.rule.name, env.session_id, env.src_party, env.dst_party, ctx.direction)
        capacity = float(ctx.rule.burst or max(1.0, rate))
        tokens, last = self._buckets.pop(key, (capacity, now))
        tokens = min(capacity, tokens + max(0.0, now - last) * rate)
        verdict: Verdict = CONTINUE
        if tokens < 1.0:
            verdict = _reject(ctx, "rate", f"more than {rate:g} messages/s (burst {capacity:g})")
        else:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > K_MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return verdict


class ControlFilter:
    """Control flow: a session of a known algorithm may carry only that algorithm's message names."""

    name = "control"

    def __init__(self, policy: AuditPolicy) -> None:
        self._policy = PolicyCache(policy)

    def inspect(self, ctx: AuditContext, *, now: float) -> Verdict:
        algo = self._policy.algorithm_for(ctx.envelope.session_id)
        if algo is None or not ctx.inspection.name:
            return CONTINUE
        if not self._policy.message_allowed(algo, ctx.inspection.name):
            return _reject(ctx, "control.message", f"{ctx.inspection.name!r} is not a message of {algo.name!r}")
        return CONTINUE


class PickleFilter:
    """Globals outside the allow list, malformed pickles/framing and inspector limits."""

    name = "pickle"

    def __init__(self, policy: AuditPolicy) -> None:
        self._globals = PolicyCache(policy)

    def inspect(self, ctx: AuditContext, *, now: float) -> Verdict:
        for event in ctx.inspection.events:
            if isinstance(event, GlobalImported):
                why = self._globals.global_verdict(event.module, event.name)
                if why is not None:
                    verb = "calls" if event.called else "imports"
                    return _reject(ctx, "pickle.global", f"pickle {verb} {event.qualname}: {why}")
            elif isinstance(event, Malformed):
                if event.where in _FRAMINGS and not ctx.rule.require_fate_framing:
                    continue  # an opaque (non-FATE) payload the policy lets through
                return _reject(ctx, f"malformed.{event.where}", event.detail)
            elif isinstance(event, ScanLimit):
                return _reject(ctx, "limit." + event.limit, event.detail)
        return CONTINUE


class KeyFilter:
    """HE public keys (alone or inside encrypted tensors) must have an allowed modulus size."""

    name = "keys"

    def inspect(self, ctx: AuditContext, *, now: float) -> Verdict:
        allowed = ctx.rule.key_bits
        for event in ctx.inspection.events:
            if isinstance(event, KeyFound):
                if event.bits == 0:
                    return _reject(ctx, "key.malformed", f"{event.scheme} public key state is not decodable")
                if allowed and event.bits not in allowed:
                    return _reject(ctx, "key.size", f"{event.scheme} key of {event.bits} bits; allowed {list(allowed)}")
            elif isinstance(event, EncryptedTensorFound):
                if not event.key_bits:
                    return _reject(ctx, "key.missing", f"encrypted tensor {event.cls} carries no readable key")
                bad = [b for b in event.key_bits if allowed and b not in allowed]
                if bad:
                    return _reject(
                        ctx, "key.size", f"encrypted tensor under a {bad[0]}-bit key; allowed {list(allowed)}"
                    )
        return CONTINUE


class TensorFilter:
    """Plain tensors: feature ranges, NaN/inf, required non-empty non-null features."""

    name = "tensors"

    def inspect(self, ctx: AuditContext, *, now: float) -> Verdict:
        rule = ctx.rule
        for event in ctx.inspection.events:
            if isinstance(event, TensorFound):
                verdict = self._check(ctx, rule, event)
                if verdict is not CONTINUE:
                    return verdict
        return CONTINUE

    @staticmethod
    def _check(ctx: AuditContext, rule: MessageRule, t: TensorFound) -> Verdict:
        what = f"tensor {t.name!r} {t.dtype}{list(t.shape)}"
        if not rule.allow_nan and t.nan:
            return _reject(ctx, "tensor.nan", f"{what} holds {t.nan} NaN values")
        if not rule.allow_inf and (t.posinf or t.neginf):
            return _reject(ctx, "tensor.inf", f"{what} holds {t.posinf + t.neginf} infinite values")
        cols = {c.index: c for c in t.columns}
        for index in rule.required_features:
            if t.empty:
                return _reject(ctx, "tensor.empty", f"{what} is empty; feature {index} is required")
            col = cols.get(index)
            if col is None:
                return _reject(ctx, "tensor.missing", f"{what} has no feature {index}")
            if col.nan:
                return _reject(ctx, "tensor.null", f"{what} feature {index} has {col.nan} missing values")
        for fr in rule.features:
            targets = [cols[i] for i in fr.columns if i in cols] if fr.columns else list(t.columns)
            lo_hi: list[tuple[int, float | None, float | None]]
            if not t.columns and not fr.columns:
                # too many features to track one by one: judge the whole tensor's range
                lo_hi = [(-1, t.min, t.max)]
            else:
                lo_hi = [(c.index, c.min, c.max) for c in targets]
            for index, lo, hi in lo_hi:
                if fr.min is not None and lo is not None and lo < fr.min:
                    return _reject(ctx, "tensor.range", f"{what} feature {index} min {lo:g} < {fr.min:g}")
                if fr.max is not None and hi is not None and hi > fr.max:
                    return _reject(ctx, "tensor.range", f"{what} feature {index} max {hi:g} > {fr.max:g}")
        return CONTINUE


K_FILTERS: Mapping[str, FilterFactory] = MappingProxyType(
    {
        "size": lambda policy: SizeFilter(),
        "rate": lambda policy: RateFilter(),
        "control": ControlFilter,
        "pickle": PickleFilter,
        "keys": lambda policy: KeyFilter(),
        "tensors": lambda policy: TensorFilter(),
    }
)
"""Every filter by name; the chain builds the ones the config lists, in that order."""

K_DEFAULT_FILTERS: tuple[str, ...] = K_DEFAULT_FILTER_ORDER
