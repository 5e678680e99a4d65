"""Policy files: strict loading with dotted-path errors, and rule matching."""

from __future__ import annotations

import pathlib
import tomllib

import pytest

from fedgate.audit.policy import AuditPolicy, GlobalsPolicy, load_policy, policy_from_data
from fedgate.errors import ConfigError

K_EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "fedgate" / "audit" / "policy.example.toml"


def test_the_shipped_example_loads() -> None:
    policy = load_policy(K_EXAMPLE)
    assert policy.default.key_bits
    assert policy.rules and policy.algorithms


def test_empty_policy_is_the_default() -> None:
    assert policy_from_data({}) == AuditPolicy()


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("[default]\nkey_bit = [1024]", "default"),
        ("[[rules]]\nname = 'a'\nmax_message_bytes = -1", "rules[0].max_message_bytes"),
        ("[[rules]]\nname = 'a'\nkey_bits = ['x']", "rules[0].key_bits[0]"),
        ("[[algorithms]]\nname = 'lr'", "algorithms[0].sessions"),
        ("[default]\n[[default.features]]\nmin = 2.0\nmax = 1.0", "default.features[0]"),
        ("[[rules]]\nname = 'a'\n[[rules]]\nname = 'a'", "rules"),
        ("[globals]\nallow = 'torch.Size'", "globals.allow"),
    ],
)
def test_errors_name_the_dotted_path(text: str, path: str, tmp_path: pathlib.Path) -> None:
    file = tmp_path / "policy.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_policy(file)
    assert info.value.path == path
    assert info.value.source == str(file)


def test_first_matching_rule_wins() -> None:
    policy = policy_from_data(
        tomllib.loads(
            """
            [default]
            name = "fallback"
            [[rules]]
            name = "pair"
            src_parties = ["9999"]
            dst_parties = ["10000"]
            messages = ["lr.*"]
            [[rules]]
            name = "session"
            sessions = ["job-7*"]
            """
        )
    )

    def rule(session: str, src: str, dst: str, message: str) -> str:
        return policy.rule_for(session=session, src=src, dst=dst, message=message).name

    assert rule("job-1", "9999", "10000", "lr.grad") == "pair"
    assert rule("job-7x", "9999", "10000", "lr.grad") == "pair"
    assert rule("job-7x", "10000", "9999", "lr.grad") == "session"
    assert rule("job-1", "9999", "10000", "sbt.hist") == "fallback"


def test_globals_policy() -> None:
    g = GlobalsPolicy(deny=("fate.*.eval*",))
    assert g.verdict("fate_utils.paillier", "PK") is None
    assert g.verdict("torch", "Size") is None
    assert g.verdict("posix", "system") == "not in the allow list"
    assert g.verdict("fate.arch.unsafe", "evaluate") is not None
    assert g.verdict("torch", "load") is not None


def test_audit_config_section_is_strict() -> None:
    from fedgate.audit import AuditConfig
    from fedgate.configtree import build

    config = build(
        AuditConfig,
        {
            "shadow": True,
            "policy_file": "conf/audit_policy.toml",
            "filters": ["pickle", "keys"],
            "checkpoint_every": 50,
        },
        path="audit",
    )
    assert (
        config.shadow and config.filters == ("pickle", "keys") and str(config.policy_file) == "conf/audit_policy.toml"
    )
    with pytest.raises(ConfigError) as info:
        build(AuditConfig, {"ledger_pth": "x"}, path="audit")
    assert info.value.path == "audit"
    with pytest.raises(ConfigError) as info:
        build(AuditConfig, {"checkpoint_every": 0}, path="audit")
    assert info.value.path == "audit.checkpoint_every"
