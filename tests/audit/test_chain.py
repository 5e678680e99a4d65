"""The filter chain: FIFO order, enforce vs shadow, metrics, rates, control flow, sizes, plug-in names."""

from __future__ import annotations

import pathlib
import pickle
import struct
import tomllib

import pytest
from prometheus_client import CollectorRegistry

from fedgate.audit import AuditChain, AuditConfig, Continue, Reject, build_filters
from fedgate.audit.policy import AuditPolicy, policy_from_data
from fedgate.errors import RejectedError, UnknownPluginError
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.protos import osx_pb2
from tests.audit.conftest import fate_inline, forged_pk_pickle, gadget_pickle, osx_envelope


def chain_of(policy_text: str = "", **config: object) -> AuditChain:
    return AuditChain(AuditConfig(**config), policy_from_data(tomllib.loads(policy_text)))  # type: ignore[arg-type]


def rule_of(chain: AuditChain, env: Envelope, *, now: float = 0.0, direction: str = "out") -> str | None:
    result = chain.inspect(env, direction, now=now)  # type: ignore[arg-type]
    return result.verdict.rule if isinstance(result.verdict, Reject) else None


def test_gadget_is_rejected_naming_the_global(canary: pathlib.Path) -> None:
    chain = chain_of()
    result = chain.inspect(osx_envelope("x", fate_inline(gadget_pickle(f"touch {canary}"))), "in", now=0.0)
    assert isinstance(result.verdict, Reject)
    assert result.verdict.rule == "pickle.global"
    assert "posix.system" in result.verdict.detail
    error = RejectedError(result.verdict.rule, result.verdict.detail)
    assert error.grpc_status == "PERMISSION_DENIED" and "posix.system" in str(error)


def test_forged_keys_follow_the_allowed_sizes() -> None:
    chain = chain_of("[default]\nkey_bits = [1024, 2048]")
    for bits, want in [(1024, None), (2048, None), (128, "key.size"), (2025, "key.size")]:
        env = osx_envelope(f"pk{bits}", fate_inline(forged_pk_pickle(bits)))
        assert rule_of(chain, env) == want, bits


def test_filters_run_in_order_and_stop_at_the_first_reject() -> None:
    text = "[default]\nkey_bits = [2048]\nmax_message_bytes = 100"
    env = osx_envelope("pk", fate_inline(forged_pk_pickle(1024)))
    assert rule_of(chain_of(text), env) == "size.message"
    assert rule_of(chain_of(text, filters=("keys", "size")), env) == "key.size"
    assert rule_of(chain_of(text, filters=("pickle",)), env) is None


def test_unknown_filter_name_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownPluginError) as info:
        build_filters(["size", "antivirus"], AuditPolicy())
    assert "antivirus" in str(info.value) and "tensors" in str(info.value)
    assert info.value.path == "audit.filters"


def test_shadow_mode_counts_without_rejecting() -> None:
    registry = CollectorRegistry()
    chain = AuditChain(AuditConfig(shadow=True), AuditPolicy(), registry=registry)
    result = chain.inspect(osx_envelope("x", fate_inline(gadget_pickle("true"))), "in", now=0.0)
    assert isinstance(result.verdict, Continue)
    assert result.shadow is not None and result.shadow.rule == "pickle.global"
    assert result.ledger_verdict == ("shadow-reject", "pickle.global")
    ok = chain.inspect(osx_envelope("y", fate_inline(pickle.dumps([1, 2], protocol=4))), "in", now=0.0)
    assert ok.ledger_verdict == ("accept", "")
    labels = {"direction": "in", "rule": "pickle.global", "mode": "shadow"}
    assert registry.get_sample_value("fedgate_audit_rejections_total", labels) == 1.0
    assert registry.get_sample_value("fedgate_audit_messages_total", {"direction": "in", "verdict": "accept"}) == 1.0


def test_enforce_mode_metrics() -> None:
    registry = CollectorRegistry()
    chain = AuditChain(AuditConfig(), AuditPolicy(), registry=registry)
    chain.inspect(osx_envelope("x", fate_inline(gadget_pickle("true"))), "out", now=0.0)
    labels = {"direction": "out", "rule": "pickle.global", "mode": "enforce"}
    assert registry.get_sample_value("fedgate_audit_rejections_total", labels) == 1.0
    assert registry.get_sample_value("fedgate_audit_messages_total", {"direction": "out", "verdict": "reject"}) == 1.0


def test_rate_limit_uses_the_given_clock() -> None:
    chain = chain_of("[default]\nmax_messages_per_s = 2.0\nburst = 2")
    env = osx_envelope("x", fate_inline(pickle.dumps(1, protocol=4)))
    assert [rule_of(chain, env, now=100.0) for _ in range(3)] == [None, None, "rate"]
    assert rule_of(chain, env, now=100.4) == "rate"  # 0.4 s at 2/s refilled 0.8 of a token
    assert rule_of(chain, env, now=100.5) is None  # now a whole token
    assert rule_of(chain, env, now=100.5) == "rate"
    other = osx_envelope("x", fate_inline(pickle.dumps(1, protocol=4)), session="other")
    assert rule_of(chain, other, now=100.4) is None  # buckets are per session


def test_control_flow_allows_only_the_algorithms_messages() -> None:
    text = "[[algorithms]]\nname = 'lr'\nsessions = ['job-lr-*']\nmessages = ['lr.*']"
    chain = chain_of(text)
    body = fate_inline(pickle.dumps(1, protocol=4))
    assert rule_of(chain, osx_envelope("lr.grad", body, session="job-lr-1")) is None
    assert rule_of(chain, osx_envelope("sbt.hist", body, session="job-lr-1")) == "control.message"
    assert rule_of(chain, osx_envelope("sbt.hist", body, session="job-sbt-1")) is None


def test_object_size_from_split_header() -> None:
    chain = chain_of("[default]\nmax_object_bytes = 1000")
    header = b"\x01" + struct.pack("!QIIIIII", 5000, 5, 1000, 4, 0, 0, 0)
    assert rule_of(chain, osx_envelope("big", header)) == "size.object"
    assert rule_of(chain, osx_envelope("small", fate_inline(pickle.dumps(1, protocol=4)))) is None


def test_garbage_payloads_are_rejected_as_malformed() -> None:
    chain = chain_of()
    env = Envelope(message_id="m", session_id="s", topic="t", src_party="1", dst_party="2", payload=b"\xff\x00junk")
    assert (rule_of(chain, env) or "").startswith("malformed.")
    assert rule_of(chain, osx_envelope("x", b"\x07abc")) == "malformed.fate"
    assert rule_of(chain, osx_envelope("x", b"not json", content_type="application/json")) == "malformed.table"


def test_opaque_payloads_can_be_let_through() -> None:
    env = Envelope(message_id="m", session_id="s", topic="t", src_party="1", dst_party="2", payload=b"\xff\x00junk")
    assert rule_of(chain_of(), env) == "malformed.osx"
    lenient = chain_of("[default]\nrequire_fate_framing = false")
    assert rule_of(lenient, env) is None
    # a Message whose head is not JSON: the body is still inspected
    bad_head = osx_pb2.Message(head=b"\xad\x01", body=fate_inline(gadget_pickle("true"))).SerializeToString()
    env = Envelope(message_id="m", session_id="s", topic="t", src_party="1", dst_party="2", payload=bad_head)
    assert rule_of(chain_of(), env) == "malformed.osx"
    assert rule_of(lenient, env) == "pickle.global"
    # a FATE message with a bad body is still malformed
    assert rule_of(lenient, osx_envelope("x", b"\x07abc")) == "malformed.fate"
    assert rule_of(lenient, osx_envelope("x", fate_inline(gadget_pickle("true")))) == "pickle.global"


def test_disabled_chain_passes_everything() -> None:
    chain = AuditChain(AuditConfig(enabled=False), AuditPolicy())
    result = chain.inspect(osx_envelope("x", fate_inline(gadget_pickle("true"))), "in", now=0.0)
    assert isinstance(result.verdict, Continue) and result.inspection is None


def test_from_config_reads_the_policy_file(tmp_path: pathlib.Path) -> None:
    file = tmp_path / "p.toml"
    file.write_text("[default]\nkey_bits = [4096]")
    chain = AuditChain.from_config(AuditConfig(policy_file=file))
    assert chain.policy.default.key_bits == (4096,)
    assert chain.filter_names == ("size", "rate", "control", "pickle", "keys", "tensors")


def test_default_policy_rejects_odd_and_small_keys() -> None:
    chain = AuditChain(AuditConfig(), AuditPolicy())
    for bits, want in [(1024, None), (2048, None), (4096, None), (128, "key.size"), (2025, "key.size")]:
        assert rule_of(chain, osx_envelope(f"pk{bits}", fate_inline(forged_pk_pickle(bits)))) == want, bits
