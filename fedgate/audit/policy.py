"""The audit policy: a TOML file validated like the appliance config (strict, dotted-path errors).

Shape of the file (every table and key is optional; see ``policy.example.toml``)::

    [globals]                   # what a pickle may import (FATE's receive side unpickles it)
    allow_prefixes = ["fate.", "fate_utils."]
    allow = ["torch.Size", ...] # exact module.name
    deny = ["fate.*.eval*"]     # glob patterns, checked before the allow lists

    [default]                   # the rule used when no [[rules]] entry matches
    key_bits = [1024, 2048, 3072, 4096]

    [[rules]]                   # first match wins (party pair, session glob, message-name glob)
    name = "guest-to-host"
    src_parties = ["9999"]
    dst_parties = ["10000"]
    sessions = ["*"]
    messages = ["*"]
    key_bits = [2048]
    required_features = [0, 1]
    max_message_bytes = 33554432
    max_messages_per_s = 200.0
    [[rules.features]]
    columns = [0, 1, 2]         # empty: every column
    min = -10.0
    max = 10.0

    [[algorithms]]              # control flow: the message names a session of this algorithm may send
    name = "coordinated_lr"
    sessions = ["*coordinated_lr*"]
    messages = ["*.lr.*", "*.fit.*"]

Rules of this module:

1. Pure: parsing and matching only; :func:`load_policy` is the one function that reads a file.
2. Every problem raises :class:`~fedgate.errors.ConfigError` naming the dotted path, at load time.
3. Matching uses ``fnmatch.fnmatchcase`` globs; an empty party list matches every party.
4. A policy is immutable, so its answers are pure functions of their arguments: :class:`PolicyCache`
   memoizes them per (party pair, session, message name) and per global, bounded (``K_CACHE_ENTRIES``
   per table, cleared whole when full), so the glob matching runs once per new key, not per message.
"""

from __future__ import annotations

import fnmatch
import pathlib
from dataclasses import dataclass, field
from typing import Any

from fedgate.configtree import bounds, build, load_toml
from fedgate.errors import ConfigError

__all__ = [
    "K_FATE_SAFE_GLOBALS",
    "AlgorithmRule",
    "AuditPolicy",
    "FeatureRange",
    "GlobalsPolicy",
    "MessageRule",
    "PolicyCache",
    "load_policy",
    "policy_from_data",
]

K_CACHE_ENTRIES = 65536  # memoized answers per PolicyCache table
K_DEFAULT_KEY_BITS = (1024, 2048, 3072, 4096)  # bits: FATE's minimum (1024) and the usual sizes above it

# FATE 2.2's own receive-side allow list outside ``fate.``/``fate_utils.`` (TableRemotePersistentUnpickler).
K_FATE_SAFE_GLOBALS: tuple[str, ...] = (
    "torch.device",
    "torch.Size",
    "torch.int64",
    "torch.int32",
    "torch.float64",
    "torch.float32",
    "torch.dtype",
    "collections.OrderedDict",
    "builtins.slice",
    "pandas.core.series.Series",
    "pandas.core.internals.managers.SingleBlockManager",
    "pandas.core.indexes.base._new_Index",
    "pandas.core.indexes.base.Index",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)


@dataclass(frozen=True, slots=True)
class GlobalsPolicy:
    """Which globals a pickle may import."""

    allow_prefixes: tuple[str, ...] = ("fate.", "fate_utils.")
    """Module-name prefixes allowed wholesale (FATE's own packages)."""
    allow: tuple[str, ...] = K_FATE_SAFE_GLOBALS
    """Exact ``module.name`` globals allowed besides the prefixes."""
    deny: tuple[str, ...] = ()
    """Glob patterns over ``module.name`` denied even when an allow entry matches (known gadgets)."""

    def verdict(self, module: str, name: str) -> str | None:
        """None when allowed, else why not."""
        qualname = f"{module}.{name}"
        for pattern in self.deny:
            if fnmatch.fnmatchcase(qualname, pattern):
                return f"matches deny pattern {pattern!r}"
        if qualname in self.allow or any(module.startswith(p) for p in self.allow_prefixes):
            return None
        return "not in the allow list"


@dataclass(frozen=True, slots=True)
class FeatureRange:
    """Allowed value range of some features (tensor columns)."""

    columns: tuple[int, ...] = ()
    """Column indices this range applies to; empty means every column."""
    min: float | None = None
    """Smallest allowed finite value (inclusive); None: unbounded."""
    max: float | None = None
    """Largest allowed finite value (inclusive); None: unbounded."""


@dataclass(frozen=True, slots=True)
class MessageRule:
    """Limits for the messages of one party pair / session pattern / message-name pattern."""

    name: str = "default"
    """Rule name, quoted in rejections."""
    sessions: tuple[str, ...] = ("*",)
    """Session-id globs this rule applies to."""
    src_parties: tuple[str, ...] = ()
    """Sending party ids; empty: any."""
    dst_parties: tuple[str, ...] = ()
    """Receiving party ids; empty: any."""
    messages: tuple[str, ...] = ("*",)
    """FATE object-name globs (table suffixes removed)."""
    key_bits: tuple[int, ...] = K_DEFAULT_KEY_BITS
    """Allowed HE public-key modulus sizes in bits; empty: any decodable size."""
    features: tuple[FeatureRange, ...] = ()
    """Allowed value ranges of plain tensor features."""
    required_features: tuple[int, ...] = ()
    """Columns every plain tensor must have, non-empty and without missing (NaN) values."""
    allow_nan: bool = True
    """Whether plain tensors may hold NaN at all (``required_features`` is checked regardless)."""
    allow_inf: bool = True
    """Whether plain tensors may hold +/-inf."""
    require_fate_framing: bool = True
    """Reject payloads that are not FATE messages (an OSX ``Message`` with a JSON head, a rollsite
    ``Packet`` with a ``RollSiteHeader``); false lets such opaque payloads through uninspected."""
    max_message_bytes: int = field(default=0, metadata=bounds(ge=0))
    """Largest message payload in bytes; 0: unlimited."""
    max_object_bytes: int = field(default=0, metadata=bounds(ge=0))
    """Largest FATE object (pickled, before splitting) in bytes; 0: unlimited."""
    max_messages_per_s: float = field(default=0.0, metadata=bounds(ge=0))
    """Sustained messages per second per (session, source, destination); 0: unlimited."""
    burst: int = field(default=0, metadata=bounds(ge=0))
    """Messages allowed at once above the rate; 0 means one second's worth."""

    def matches(self, *, session: str, src: str, dst: str, message: str) -> bool:
        return (
            (not self.src_parties or src in self.src_parties)
            and (not self.dst_parties or dst in self.dst_parties)
            and any(fnmatch.fnmatchcase(session, p) for p in self.sessions)
            and any(fnmatch.fnmatchcase(message, p) for p in self.messages)
        )


@dataclass(frozen=True, slots=True)
class AlgorithmRule:
    """Control flow: the only message names a session of this algorithm may carry."""

    name: str = field(default="", metadata=bounds(nonempty=True))
    """Algorithm name, quoted in rejections."""
    sessions: tuple[str, ...] = field(default=(), metadata=bounds(nonempty=True))
    """Session-id globs that identify the algorithm's sessions."""
    messages: tuple[str, ...] = ()
    """Allowed FATE object-name globs."""


@dataclass(frozen=True, slots=True)
class AuditPolicy:
    """The whole policy file."""

    globals: GlobalsPolicy = GlobalsPolicy()
    default: MessageRule = MessageRule()
    rules: tuple[MessageRule, ...] = ()
    algorithms: tuple[AlgorithmRule, ...] = ()

    def rule_for(self, *, session: str, src: str, dst: str, message: str) -> MessageRule:
        """The first ``[[rules]]`` entry that matches, else ``[default]``."""
        for rule in self.rules:
            if rule.matches(session=session, src=src, dst=dst, message=message):
                return rule
        return self.default

    def algorithm_for(self, session: str) -> AlgorithmRule | None:
        for algo in self.algorithms:
            if any(fnmatch.fnmatchcase(session, p) for p in algo.sessions):
                return algo
        return None

    def validate(self, *, source: str = "") -> None:
        for i, rule in enumerate((self.default, *self.rules)):
            where = "default" if i == 0 else f"rules[{i - 1}]"
            for j, fr in enumerate(rule.features):
                if fr.min is not None and fr.max is not None and fr.min > fr.max:
                    raise ConfigError("min > max", path=f"{where}.features[{j}]", source=source)
                if any(c < 0 for c in fr.columns):
                    raise ConfigError("negative column", path=f"{where}.features[{j}].columns", source=source)
            if any(c < 0 for c in rule.required_features):
                raise ConfigError("negative column", path=f"{where}.required_features", source=source)
            if any(b <= 0 for b in rule.key_bits):
                raise ConfigError("key sizes must be positive", path=f"{where}.key_bits", source=source)
        for i, algo in enumerate(self.algorithms):
            if not algo.name:
                raise ConfigError("must be set", path=f"algorithms[{i}].name", source=source)
            if not algo.sessions:
                raise ConfigError(
                    "must list at least one session glob", path=f"algorithms[{i}].sessions", source=source
                )
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ConfigError("rule names repeat", path="rules", source=source)


class PolicyCache:
    """Memoized answers of one (immutable) policy; see rule 4. Not thread-safe: one per chain."""

    __slots__ = ("_algorithms", "_globals", "_messages", "_rules", "policy")

    def __init__(self, policy: AuditPolicy) -> None:
        self.policy = policy
        self._rules: dict[tuple[str, str, str, str], MessageRule] = {}
        self._algorithms: dict[str, AlgorithmRule | None] = {}
        self._messages: dict[tuple[str, str], bool] = {}
        self._globals: dict[tuple[str, str], str | None] = {}

    def rule_for(self, *, session: str, src: str, dst: str, message: str) -> MessageRule:
        key = (session, src, dst, message)
        rule = self._rules.get(key)
        if rule is None:
            rule = self.policy.rule_for(session=session, src=src, dst=dst, message=message)
            _bounded(self._rules)[key] = rule
        return rule

    def algorithm_for(self, session: str) -> AlgorithmRule | None:
        try:
            return self._algorithms[session]
        except KeyError:
            algo = _bounded(self._algorithms)[session] = self.policy.algorithm_for(session)
            return algo

    def message_allowed(self, algo: AlgorithmRule, message: str) -> bool:
        """Whether ``message`` matches one of ``algo``'s message globs."""
        key = (algo.name, message)
        allowed = self._messages.get(key)
        if allowed is None:
            allowed = any(fnmatch.fnmatchcase(message, p) for p in algo.messages)
            _bounded(self._messages)[key] = allowed
        return allowed

    def global_verdict(self, module: str, name: str) -> str | None:
        """:meth:`GlobalsPolicy.verdict`, memoized."""
        key = (module, name)
        try:
            return self._globals[key]
        except KeyError:
            why = _bounded(self._globals)[key] = self.policy.globals.verdict(module, name)
            return why


def _bounded(table: dict[Any, Any]) -> dict[Any, Any]:
    if len(table) >= K_CACHE_ENTRIES:
        table.clear()
    return table


def policy_from_data(data: object, *, source: str = "") -> AuditPolicy:
    """Build and validate a policy from parsed TOML."""
    policy = build(AuditPolicy, data, source=source)
    policy.validate(source=source)
    return policy


def load_policy(path: pathlib.Path | str) -> AuditPolicy:
    """Read and validate a policy file; every problem is a ConfigError naming the file and key."""
    return policy_from_data(load_toml(path), source=str(path))
